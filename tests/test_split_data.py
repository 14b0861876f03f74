"""split_data.py: download (resumed, verified), safe extraction, a deterministic split."""

import ast
import hashlib
import io
import json
import shutil
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import (
    REPO,
    SAMPLE,
    jpeg_bytes,
    load_module,
    load_script,
    make_image_folder,
)
from conftest import run_script as run

SCRIPT = REPO / "split_data.py"


def listing(out: Path) -> dict[str, list[str]]:
    """Every file of the split, by subset, as sorted relative paths."""
    return {
        sub: sorted(p.relative_to(out / sub).as_posix() for p in (out / sub).rglob("*.*"))
        for sub in ("train", "val")
    }


def make_tgz(path: Path, source: Path, arcname: str = "flower_photos") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(source, arcname=arcname)
    return path


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("split_data.py: error:"), result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


# --- download ------------------------------------------------------------------------------


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves one folder and honours "Range: bytes=N-" as a real mirror would."""

    log: list = []

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header and header.startswith("bytes=") and header.endswith("-"):
            start = int(header[len("bytes=") : -1])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                self.log.append((header, 416, 0))
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])
        self.log.append((header, 206 if start else 200, len(data) - start))

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server that serves a flower-style archive built from generated JPEGs."""
    served = tmp_path / "served"
    served.mkdir()
    photos = make_image_folder(tmp_path / "photos", classes=("daisy", "roses"), per_class=20)
    (photos / "LICENSE.txt").write_text("generated for the test\n")
    archive = make_tgz(served / "flower_photos.tgz", photos)
    RangeHandler.log = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/flower_photos.tgz"
    yield url, archive, RangeHandler.log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def project(tmp_path):
    """A copy of split_data.py in its own folder: its data/ is where the script lives."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(SCRIPT, proj / "split_data.py")
    return proj


def test_download_verifies_extracts_and_splits(server, project, tmp_path):
    url, archive, log = server
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = run(project / "split_data.py", "--url", url, "--sha256", sha, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (project / "data" / "flower_photos.tgz").read_bytes() == archive.read_bytes()
    assert not (project / "data" / "flower_photos.tgz.part").exists()
    assert (project / "data" / "flower_data" / "flower_photos" / "daisy").is_dir()
    out = project / "data" / "flower_data"
    files = listing(out)
    assert len(files["train"]) == 36 and len(files["val"]) == 4
    assert log == [(None, 200, archive.stat().st_size)]
    # A second run uses what is there: no new request, the same split.
    again = run(project / "split_data.py", "--url", url, "--sha256", sha, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(log) == 1
    assert listing(out) == files
    assert "the same split as before" in again.stdout


def test_partial_download_is_resumed_with_a_range_request(server, project, tmp_path):
    url, archive, log = server
    data = archive.read_bytes()
    cut = len(data) * 2 // 5
    (project / "data").mkdir()
    (project / "data" / "flower_photos.tgz.part").write_bytes(data[:cut])
    sha = hashlib.sha256(data).hexdigest()
    result = run(project / "split_data.py", "--url", url, "--sha256", sha, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert log == [(f"bytes={cut}-", 206, len(data) - cut)]
    assert (project / "data" / "flower_photos.tgz").read_bytes() == data
    assert "resuming" in result.stdout


def test_checksum_mismatch_deletes_the_file_and_fails(server, project, tmp_path):
    url, _, _ = server
    result = run(project / "split_data.py", "--url", url, "--sha256", "0" * 64, cwd=tmp_path)
    assert_one_line_error(result, "checksum mismatch")
    data = project / "data"
    assert sorted(p.name for p in data.iterdir()) == []
    assert not (data / "flower_data").exists()


def test_no_network_says_how_to_use_source(project, tmp_path):
    # Port 9 on the loopback (discard) has no listener here: the connection is refused.
    result = run(project / "split_data.py", "--url", "http://127.0.0.1:9/flower_photos.tgz")
    assert_one_line_error(result, "cannot download", "--sample", "--source")


# --- safe extraction -------------------------------------------------------------------------


def tar_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"flower_photos/daisy/ok_{i}.jpg")
            body = jpeg_bytes(i)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
        member.size = len(payload) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


def symlink_member() -> tarfile.TarInfo:
    info = tarfile.TarInfo("flower_photos/daisy/link.jpg")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def hardlink_member() -> tarfile.TarInfo:
    info = tarfile.TarInfo("flower_photos/daisy/hard.jpg")
    info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    return info


def device_member() -> tarfile.TarInfo:
    info = tarfile.TarInfo("flower_photos/daisy/dev.jpg")
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    "make_member",
    [
        lambda tmp: tarfile.TarInfo("flower_photos/../../escaped.txt"),
        lambda tmp: tarfile.TarInfo(str(tmp / "absolute.txt")),
        lambda tmp: symlink_member(),
        lambda tmp: hardlink_member(),
        lambda tmp: device_member(),
    ],
    ids=["traversal", "absolute", "symlink", "hardlink", "device"],
)
def test_malicious_tar_is_refused_and_writes_nothing(tmp_path, make_member):
    work = tmp_path / "work"
    work.mkdir()
    archive = tar_with(tmp_path / "evil.tgz", make_member(tmp_path), b"owned\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    result = run(SCRIPT, "--source", archive, "--out", work / "out", cwd=work)
    assert_one_line_error(result, "refusing")
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_malicious_zip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("flower_photos/daisy/ok.jpg", jpeg_bytes(1))
        zf.writestr("flower_photos/../../escaped.txt", b"owned\n")
    result = run(SCRIPT, "--source", archive, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "refusing")
    assert not list(tmp_path.parent.rglob("escaped.txt"))


def test_unreadable_archive_is_one_line(tmp_path):
    archive = tmp_path / "broken.tgz"
    archive.write_bytes(b"this is not a gzip file at all")
    result = run(SCRIPT, "--source", archive, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "cannot read archive", "broken.tgz")


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_archive_source_with_a_wrapper_folder(tmp_path, kind):
    photos = make_image_folder(tmp_path / "photos", per_class=10)
    if kind == "tgz":
        archive = make_tgz(tmp_path / "mine.tar.gz", photos, arcname="mine")
    else:
        archive = tmp_path / "mine.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(photos.rglob("*.jpg")):
                zf.write(p, f"mine/{p.relative_to(photos).as_posix()}")
    out = tmp_path / "out"
    result = run(SCRIPT, "--source", archive, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = listing(out)
    assert [f.split("/")[0] for f in files["val"]] == ["a", "b", "c"]
    assert len(files["train"]) == 27
    # The temporary extraction folder beside out is gone again.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["photos", archive.name, "out"])


# --- the split -------------------------------------------------------------------------------


def test_the_projects_own_photos_are_small_and_credited():
    photos = sorted(SAMPLE.glob("*/*.jpg"))
    assert len(photos) == 150 and sum(p.stat().st_size for p in photos) < 5 * 2**20
    assert {p.parent.name for p in photos} == {
        "daisy",
        "dandelion",
        "roses",
        "sunflowers",
        "tulips",
    }
    assert all(min(Image.open(p).size) <= 256 for p in photos)
    credits = (SAMPLE / "LICENSE.txt").read_text()
    assert "creativecommons.org/licenses/by/2.0" in credits
    credited = {line.split(" ", 1)[0] for line in credits.splitlines() if " by " in line}
    assert credited >= {f"{p.parent.name}/{p.name}" for p in photos}


def test_sample_split_counts_and_repeatability(tmp_path):
    out = tmp_path / "flower_data"
    first = run(SCRIPT, "--sample", "--out", out, cwd=tmp_path)  # no network needed
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "split.json").read_text())
    classes = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    for name in classes:
        n = len(list((SAMPLE / name).glob("*.jpg")))
        expected_val = int(n * 0.1)
        assert manifest["classes"][name] == {"train": n - expected_val, "val": expected_val}
        assert len(list((out / "val" / name).iterdir())) == expected_val
        assert f"{name}" in first.stdout
        assert manifest["classes"][name] == {"train": 27, "val": 3}
    files = listing(out)
    second = run(SCRIPT, "--source", SAMPLE, "--out", out, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert listing(out) == files
    assert json.loads((out / "split.json").read_text()) == manifest
    assert "the same split as before" in second.stdout
    # A different seed gives a different split of the same sizes.
    other = run(SCRIPT, "--source", SAMPLE, "--out", tmp_path / "s1", "--seed", "1")
    assert other.returncode == 0, other.stderr
    assert listing(tmp_path / "s1")["val"] != files["val"]
    assert len(listing(tmp_path / "s1")["val"]) == len(files["val"])


def test_split_does_not_depend_on_directory_listing_order(tmp_path, monkeypatch):
    split_data = load_module(SCRIPT, "split_data_under_test")
    parser = split_data.get_args_parser()
    split_data.main(parser.parse_args(["--source", str(SAMPLE), "--out", str(tmp_path / "a")]))

    real_rglob, real_iterdir = Path.rglob, Path.iterdir
    monkeypatch.setattr(Path, "rglob", lambda self, pat: reversed(list(real_rglob(self, pat))))
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(real_iterdir(self))))
    split_data.main(parser.parse_args(["--source", str(SAMPLE), "--out", str(tmp_path / "b")]))
    assert listing(tmp_path / "a") == listing(tmp_path / "b")


def test_corrupt_and_stray_files_are_skipped_and_reported(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=10)
    good = jpeg_bytes(7, size=(120, 90))
    (source / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (source / "b" / "notes.txt").write_text("not a photo\n")
    (source / "b" / "fake.jpg").write_text("a text file named like a photo\n")
    (source / "c" / ".DS_Store").write_bytes(b"\0\1hidden")
    (source / ".hidden_class").mkdir()
    (source / ".hidden_class" / "x.jpg").write_bytes(jpeg_bytes(3))
    out = tmp_path / "out"
    result = run(SCRIPT, "--source", source, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 3 file(s)" in result.stdout
    for name in ("a/truncated.jpg", "b/notes.txt", "b/fake.jpg"):
        assert name in result.stdout
    assert ".DS_Store" not in result.stdout
    manifest = json.loads((out / "split.json").read_text())
    assert set(manifest["classes"]) == {"a", "b", "c"}
    assert all(c == {"train": 9, "val": 1} for c in manifest["classes"].values())
    assert len(manifest["skipped"]) == 3


def test_link_makes_hard_links(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=10)
    out = tmp_path / "out"
    result = run(SCRIPT, "--source", source, "--out", out, "--link", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    placed = out / "train" / "a" / "img_000.jpg"
    if not placed.exists():
        placed = out / "val" / "a" / "img_000.jpg"
    assert placed.samefile(source / "a" / "img_000.jpg")


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        (lambda src: None, ["--val-ratio", "1.5"], "--val-ratio"),
        (lambda src: shutil.rmtree(src), [], "does not exist"),
        (lambda src: [shutil.rmtree(p) for p in src.iterdir()], [], "no class folders"),
        (lambda src: [p.unlink() for p in (src / "b").iterdir()], [], "has 0 usable image"),
        (lambda src: None, ["--val-ratio", "0.05"], "none would go to val"),
        (lambda src: (src / "file.txt").write_text("x"), ["--source-is-file"], "neither"),
    ],
    ids=["ratio", "missing", "empty-source", "empty-class", "tiny-class", "not-a-dataset"],
)
def test_bad_input_is_one_clear_line(tmp_path, setup, args, needle):
    source = make_image_folder(tmp_path / "src", per_class=10)
    setup(source)
    if args == ["--source-is-file"]:
        source, args = source / "file.txt", []
    result = run(SCRIPT, "--source", source, "--out", tmp_path / "out", *args, cwd=tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out" / "train").exists()


def test_never_replaces_a_train_folder_it_did_not_make(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=10)
    mine = tmp_path / "out" / "train" / "precious.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"user data")
    result = run(SCRIPT, "--source", source, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "not made by split_data.py")
    assert mine.read_bytes() == b"user data"


def test_the_code_it_repeats_is_utils_pys():
    """split_data.py stands alone, so it repeats utils.py's Ctrl-C exit, its check for a
    running process and the suffixes of a photo: the copies match."""

    def functions(path: Path) -> dict[str, str]:
        tree = ast.parse(path.read_text())
        return {n.name: ast.dump(n) for n in tree.body if isinstance(n, ast.FunctionDef)}

    ours, utils = functions(SCRIPT), functions(REPO / "resnet" / "utils.py")
    for name in ("running", "exit_interrupted"):
        assert ours[name] == utils[name], f"split_data.py's {name} is not resnet/utils.py's"
    split_data_py, utils_py = load_module(SCRIPT), load_script("resnet", "utils")
    assert split_data_py.IMG_EXTENSIONS == utils_py.IMAGE_SUFFIXES
    assert split_data_py.MAX_ASPECT == utils_py.MAX_ASPECT
