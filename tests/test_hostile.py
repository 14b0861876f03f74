"""The second round of hostile inputs (issue 29): each case as written there, in this process
where it can be, and a check that nothing was lost (every byte of the inputs and of the
previous split) or one true line came out."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import LENET, REPO, jpeg_bytes, load_module, load_script, make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SPLIT_DATA = REPO / "split_data.py"


def digests(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) by its content: a changed byte shows."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def split_data(*argv):
    """split_data.py's main() on these flags, in this process."""
    module = load_module(SPLIT_DATA, "split_data_hostile")
    module.main(module.get_args_parser().parse_args(list(map(str, argv))))
    return module


def refused_split(*argv, match: str) -> None:
    module = load_module(SPLIT_DATA, "split_data_hostile")
    with pytest.raises(module.SplitError, match=match):
        module.main(module.get_args_parser().parse_args(list(map(str, argv))))


def dead_pid() -> int:
    return int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout
    )


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_image_folder(tmp_path / "photos", per_class=10)


# --- split_data.py: data lost or corrupted ---------------------------------------------------


def test_a_sibling_splits_temporary_folder_is_not_taken_for_a_leftover(photos, tmp_path):
    """Case 2: `--out X` must not delete the temporary folder of `--out X-split`, running."""
    sibling = tmp_path / f".X-split-split-{os.getppid()}-abcd_123"
    make_image_folder(sibling / "train", per_class=2)
    before = digests(sibling)
    split_data("--source", photos, "--out", tmp_path / "X")
    assert digests(sibling) == before


@pytest.mark.parametrize("change", ["crop", "hidden file", "crop through a --link"])
def test_a_changed_split_is_kept_and_the_resplit_refused(change, photos, tmp_path):
    """Case 3 and 4: a photo edited in place (size kept: not a change of names) or a hidden
    file added makes the split the user's; with --link the edit reached the source too, and the
    split that shows it is kept all the same."""
    out = tmp_path / "out"
    split_data("--source", photos, "--out", out, *["--link"] * ("link" in change))
    photo = sorted((out / "train" / "a").iterdir())[0]
    if change == "hidden file":
        (out / "train" / "a" / ".notes").write_text("mine")
    else:
        with open(photo, "r+b") as f:  # in place: a hard link sees it, the size stays
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\x00\x00")
    before, sources = digests(out), digests(photos)
    refused_split("--source", photos, "--out", out, "--val-ratio", "0.3", match="changed since")
    assert digests(out) == before and digests(photos) == sources


def run_killed_after(renames: int, *argv) -> subprocess.CompletedProcess:
    """split_data.py as a command, killed (os._exit, no clean-up at all) after `renames` renames."""
    code = f"""
import os, pathlib, runpy, sys
real, done = pathlib.Path.replace, []
def replace(self, target):
    if len(done) == {renames}:
        os._exit(9)
    done.append(self)
    return real(self, target)
pathlib.Path.replace = replace
sys.argv = {[str(SPLIT_DATA), *map(str, argv)]!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("renames", [1, 2, 5])
def test_a_kill_during_the_swap_is_put_back_by_the_next_run(renames, photos, tmp_path):
    """Case 5: killed after the first rename (out holds val/ alone), the second (train/ of the
    new seed beside val/ of the old: shared photos) or the fifth; the next run puts the previous
    split back whole, then writes its own; train.py would have refused the half split."""
    out, again = tmp_path / "out", ["--source", photos, "--out", tmp_path / "out", "--seed", "1"]
    split_data("--source", photos, "--out", out)
    previous = digests(out)
    assert run_killed_after(renames, *again).returncode == 9
    assert digests(out) != previous  # half swapped
    if renames < 5:  # after the fifth, out holds the new train/ and val/, without split.json
        train_py = load_script("lenet", "train")
        args = train_py.get_args_parser().parse_args(["--data-path", str(out), *LENET])
        with pytest.raises(train_py.UserError, match="both train/ and val/|split.json|not found"):
            train_py.load_datasets(args, train_py.utils.Run(torch.device("cpu"), None, "fp32"), 0)
    module = load_module(SPLIT_DATA, "split_data_hostile")
    module.remove_leftovers(out)
    assert digests(out) == previous and not list(tmp_path.glob(".out-*"))
    split_data(*again)
    split_data("--source", photos, "--out", tmp_path / "fresh", "--seed", "1")
    fresh = {k: v for k, v in digests(tmp_path / "fresh").items() if k != "split.json"}
    assert {k: v for k, v in digests(out).items() if k != "split.json"} == fresh


def test_train_refuses_a_split_unlike_its_split_json_or_sharing_a_photo(photos, tmp_path):
    """Case 5's second half: a photo in train/ and val/ is always an error; a split.json that
    does not describe its folders is refused, with what to do; without one, a split is the
    user's own (the same file name in train/ and val/ with other bytes is fine)."""
    out = tmp_path / "out"
    split_data("--source", photos, "--out", out)
    train_py = load_script("lenet", "train")
    args = train_py.get_args_parser().parse_args(["--data-path", str(out), *LENET])
    run = train_py.utils.Run(torch.device("cpu"), None, "fp32")
    assert len(train_py.load_datasets(args, run, 0)[2]) == 3
    val_photo = sorted((out / "val" / "b").iterdir())[0]
    (out / "train" / "b" / val_photo.name).write_bytes(val_photo.read_bytes())
    with pytest.raises(
        train_py.UserError, match=f"1 photo.s. in both train/ and val/, such as b/{val_photo.name}"
    ):
        train_py.load_datasets(args, run, 0)
    (out / "train" / "b" / val_photo.name).write_bytes(jpeg_bytes(999))  # other bytes
    with pytest.raises(
        train_py.UserError, match="not the split its split.json describes.*delete split.json"
    ):
        train_py.load_datasets(args, run, 0)
    (out / "split.json").unlink()
    assert len(train_py.load_datasets(args, run, 0)[0]) == 3 * 9 + 1


def test_links_and_hidden_folders_are_read_by_one_rule_in_every_script(tmp_path):
    """Case 6 and the hidden sub-folders: loops (`loop -> .`, `up -> ..`) are not followed, a
    link to a photo counts once, hidden folders and .ipynb_checkpoints are no photos and no
    class; train.py, --eval, plain predict and split_data.py find the same photos."""
    root = make_image_folder(tmp_path / "train", per_class=3)
    (root / "a" / "loop").symlink_to(".")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / ".thumbs").mkdir()
    (root / "a" / ".thumbs" / "t.jpg").write_bytes(jpeg_bytes(7))
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.jpg").write_bytes(jpeg_bytes(8))
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=("z",), per_class=1)
    (root / "b" / "linked.jpg").symlink_to(elsewhere / "z" / "img_000.jpg")
    expected = {(c, f"img_00{i}.jpg") for c in "abc" for i in range(3)} | {("b", "linked.jpg")}

    utils = load_script("lenet", "utils")
    found = utils.PhotoFolder(root)
    assert found.classes == ["a", "b", "c"]
    assert {(found.classes[t], Path(p).name) for p, t in found.samples} == expected
    predict_py = load_script("lenet", "predict")
    files, labels, _ = predict_py.labelled_images(root, ["a", "b", "c"])
    assert {
        (["a", "b", "c"][t], p.name) for p, t in zip(files, labels.tolist(), strict=True)
    } == expected
    plain, _ = predict_py.find_images([root])
    assert {(p.parent.name, p.name) for p in plain} == expected
    module = load_module(SPLIT_DATA, "split_data_hostile")
    classes, skipped = module.list_classes(root)
    assert {(c, p.name) for c, paths in classes.items() for p in paths} == expected
    assert sorted(skipped) == [
        "a/loop: a link to a folder, not followed",
        "a/up: a link to a folder, not followed",
    ]


def test_what_cannot_be_a_photo_in_the_source_is_listed_as_skipped(photos, tmp_path, capsys):
    (photos / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(photos / "b" / "pipe.jpg")
    split_data("--source", photos, "--out", tmp_path / "out")
    printed = capsys.readouterr().out
    assert "a/gone.jpg: not a file" in printed and "b/pipe.jpg: not a file" in printed
    assert "skipped 2 file(s)" in printed


# --- split_data.py: misleading lines ---------------------------------------------------------


def test_a_zip_written_by_zipfile_writestr_is_split(tmp_path):
    """Python's zipfile.writestr sets no file-type bits: a plain file all the same."""
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for c in "ab":
            for i in range(10):
                zf.writestr(f"photos/{c}/{i}.jpg", jpeg_bytes(10 * ord(c) + i))
    split_data("--source", archive, "--out", tmp_path / "new" / "deeper" / "out")  # no parents
    assert (
        json.loads((tmp_path / "new" / "deeper" / "out" / "split.json").read_text())["train"] == 18
    )


def test_a_full_disk_leaves_no_empty_out_and_a_second_run_is_refused(photos, tmp_path, monkeypatch):
    module = load_module(SPLIT_DATA, "split_data_hostile")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "place", full)
    out = tmp_path / "a" / "out"
    with pytest.raises(module.SplitError, match="no space left"):
        module.main(
            module.get_args_parser().parse_args(["--source", str(photos), "--out", str(out)])
        )
    assert not (tmp_path / "a").exists()  # nothing it made is left, empty
    monkeypatch.undo()
    lock = tmp_path / ".out.split-lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process: pytest's parent
    refused_split(
        "--source",
        photos,
        "--out",
        tmp_path / "out",
        match=f"another split_data.py .process {os.getppid()}. writes to",
    )
    lock.write_text(str(dead_pid()))  # a killed run's: taken over, and gone at the end
    split_data("--source", photos, "--out", tmp_path / "out")
    assert not lock.exists() and (tmp_path / "out" / "split.json").is_file()


def test_an_out_whose_parent_cannot_be_written_is_refused_before_any_image_is_read(
    photos, tmp_path, monkeypatch
):
    """out/ exists and takes files, its parent (where the new split is built) does not."""
    module = load_module(SPLIT_DATA, "split_data_hostile")
    (tmp_path / "out").mkdir()
    real = module.tempfile.TemporaryFile

    def temporary_file(dir):
        if Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(dir=dir)

    monkeypatch.setattr(module.tempfile, "TemporaryFile", temporary_file)
    monkeypatch.setattr(module, "check_images", lambda *a: pytest.fail("images read first"))
    with pytest.raises(
        module.SplitError, match=f"cannot be written .Permission denied: {tmp_path}"
    ):
        module.main(
            module.get_args_parser().parse_args(
                ["--source", str(photos), "--out", str(tmp_path / "out")]
            )
        )


def test_a_loop_of_links_in_a_path_is_one_line(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    refused_split(
        "--source", loop, "--out", tmp_path / "out", match="loop2? is a loop of symbolic links"
    )
    refused_split("--source", tmp_path, "--out", loop / "x", match="loop of symbolic links")
    for family, script, argv in [
        ("lenet", "train", ["--data-path", loop]),
        ("resnet", "train", ["--output-dir", loop / "o"]),
        ("vgg", "predict", [loop / "photo.jpg"]),
        ("alexnet", "predict", ["x.jpg", "--weights", loop]),
        ("googlenet", "predict", ["x.jpg", "--save", loop]),
    ]:
        parser = load_script(family, script).get_args_parser()
        with pytest.raises(SystemExit):
            parser.parse_args(list(map(str, argv)))
        assert "is a loop of symbolic links" in capsys.readouterr().err.splitlines()[-1]


# --- photos that cannot be read, or are absurd -----------------------------------------------


def test_a_photo_gone_or_looping_at_read_time_is_a_short_reason(tmp_path):
    utils = load_script("lenet", "utils")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    for name, reason in (("gone.jpg", "No such file"), ("a.jpg", "Too many levels")):
        with pytest.raises(utils.UserError, match=f"cannot read image .*{name} .*{reason}"):
            utils.load_image(str(tmp_path / name))


def test_a_very_thin_image_is_refused_by_every_script(tiny, tiny_run, tmp_path, capsys):
    thin = tiny / "val" / "a" / "thin.png"
    Image.new("RGB", (30_000, 1), "red").save(thin)
    utils = load_script("lenet", "utils")
    with pytest.raises(ValueError, match="30000 x 1 pixels: too thin"):
        utils.open_rgb(thin)
    assert "too thin" in load_module(SPLIT_DATA, "split_data_hostile").image_problem(thin)
    predict_py = load_script("lenet", "predict")
    argv = [
        str(tiny / "val"),
        "--eval",
        "--json",
        "--weights",
        str(tiny_run),
        "--save",
        str(tmp_path / "e"),
    ]
    assert predict_py.main(predict_py.get_args_parser().parse_args(argv)) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["images"] == 6 and "thin.png" in err and "too thin" in err


# --- outputs: read-only disks, locks ---------------------------------------------------------


def test_a_read_only_disk_tells_its_own_error(tmp_path, monkeypatch):
    """write_file's clean-up on a read-only disk fails too: the error told is the write's."""
    utils = load_script("lenet", "utils")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(utils.UserError, match="cannot write .*f.txt .Read-only file system"):
        utils.write_file(tmp_path / "f.txt", lambda f: read_only())
    utils.remove_quietly(tmp_path / ".lock")  # the lock's removal at exit, quietly


def test_lock_files_of_every_kind_are_told_or_taken_over(tmp_path):
    utils = load_script("lenet", "utils")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()}\n")  # a live process, a newline after it
    with pytest.raises(utils.UserError, match=rf"another run \(process {os.getppid()}\) writes to"):
        utils.prepare_output_dir(out)
    (out / ".lock").unlink()
    (out / ".lock").mkdir()
    with pytest.raises(utils.UserError, match="is not a lock file of train.py; remove it"):
        utils.prepare_output_dir(out)
    (out / ".lock").rmdir()
    (out / ".lock").symlink_to(tmp_path / "nowhere")
    with pytest.raises(utils.UserError, match="is not a lock file of train.py; remove it"):
        utils.prepare_output_dir(out)
    (out / ".lock").unlink()
    (out / ".lock").write_text("")  # empty and a minute old: a run killed as it began
    os.utime(out / ".lock", (os.path.getmtime(out / ".lock") - 60,) * 2)
    utils.prepare_output_dir(out)
    assert (out / ".lock").read_text() == str(os.getpid())
    (out / ".lock").unlink()


# --- checkpoints read back -------------------------------------------------------------------


def odd_checkpoints(last: dict) -> dict[str, dict]:
    return {
        "no scheduler": {k: v for k, v in last.items() if k != "scheduler"},
        "epoch as text": {**last, "epoch": "1"},
        "history not a list": {**last, "history": "x"},
        "args without lr": {**last, "args": {k: v for k, v in last["args"].items() if k != "lr"}},
        "optimizer of another network": {**last, "optimizer": {"state": {}, "param_groups": [{}]}},
        "image_size True": {**last, "image_size": True},
        "image_size 10**6": {**last, "image_size": 10**6},
        "classes not names": {**last, "classes": [1, 2, 3]},
        "mean as text": {**last, "mean": "0.5"},
        "a zero std": {**last, "std": [0.2, 0.0, 0.2]},
        "history rows without val_acc": {**last, "history": [{"epoch": 1}]},
    }


@pytest.mark.parametrize("case", list(odd_checkpoints({"args": {}})))
def test_a_resume_checkpoint_with_odd_contents_is_one_line(case, tiny, tiny_run, tmp_path):
    last = torch.load(tiny_run.with_name("last.pth"), weights_only=True)
    path = tmp_path / "odd.pth"
    torch.save(odd_checkpoints(last)[case], path)
    train_py = load_script("lenet", "train")
    argv = [
        "--data-path",
        tiny,
        "--output-dir",
        tmp_path / "o",
        "--resume",
        path,
        *LENET[2:],
        "--epochs",
        "3",
    ]
    with pytest.raises(train_py.UserError, match=str(path)):
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))


def test_a_fifo_as_a_checkpoint_is_refused_not_waited_on(tmp_path):
    utils = load_script("lenet", "utils")
    os.mkfifo(tmp_path / "last.pth")
    errors = []

    def load():
        try:
            utils.load_checkpoint(tmp_path / "last.pth", "lenet")
        except utils.UserError as e:
            errors.append(str(e))

    reader = threading.Thread(target=load, daemon=True)  # a hung read must not hang the suite
    reader.start()
    reader.join(timeout=30)
    assert errors == [f"{tmp_path / 'last.pth'} is not a checkpoint (not a file)"]


def test_class_names_are_printed_escaped(tiny, tiny_run, tmp_path, capsys):
    """A checkpoint's class names cannot recolour the terminal or forge a result line."""
    best = torch.load(tiny_run, weights_only=True)
    forged = tmp_path / "forged.pth"
    torch.save({**best, "classes": ["\x1b[31mred", "b\nphoto.jpg: a 1.000", "c"]}, forged)
    predict_py = load_script("lenet", "predict")
    argv = [str(tiny / "val" / "a"), "--weights", str(forged), "--topk", "3"]
    assert predict_py.main(predict_py.get_args_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out
    assert not any(line.startswith("photo.jpg") for line in out.splitlines())
