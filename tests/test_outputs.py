"""Nothing a script writes lands on what it reads, and a run owns its output folder.

One rule for every path a script writes (predict.py --save and its --eval folder, train.py
--output-dir, split_data.py --out and its temporaries): never equal to, inside, or holding a
path the run reads, resolved through links; refused in one line before any work. Then the
cases a hostile probe found (issue 22), each rerun as written: nothing lost, one true line.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_failures import assert_one_line_error, run, small_disk

from conftest import LENET, REPO, jpeg_bytes, load_module, load_script, make_image_folder


def digests(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) by its content: a changed byte shows."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def call(module, *argv):
    """module.main on these flags, in this process."""
    return module.main(module.get_args_parser().parse_args(list(map(str, argv))))


@pytest.fixture
def split(tmp_path) -> Path:
    """A split made by split_data.py (train/val/test) of generated photos."""
    out = tmp_path / "D"
    photos = make_image_folder(tmp_path / "photos", per_class=10)
    made = run("split_data.py", "--source", photos, "--out", out, "--test-ratio", "0.1")
    assert made.returncode == 0, made.stderr
    return out


# --- the probe's cases, as scripts ----------------------------------------------------------


def test_the_probes_cases_lose_nothing(split, tiny_run, tmp_path):
    """Issue 22's cases 1, 3 and 5 as a user types them: refused before any work (predict.py
    in this process, as run_command runs it), every photo and split file byte-identical."""
    before = digests(split)
    photo = next((split / "test" / "a").iterdir())
    predict_py = load_script("lenet", "predict")
    with pytest.raises(predict_py.UserError, match=f"--save {photo} would overwrite {photo}"):
        call(predict_py, photo, "--weights", tiny_run, "--save", photo)  # 1
    evaluation = [split / "test", "--eval", "--weights", tiny_run, "--save", split / "test" / "b"]
    with pytest.raises(predict_py.UserError, match=f"{split}/test/b is inside {split}/test,"):
        call(predict_py, *evaluation)  # 5
    result = run("split_data.py", "--source", split / "train", "--out", split, "--val-ratio", "0.2")
    last = assert_one_line_error(result, "split_data.py", "which the split replaces")  # 3
    assert result.stdout == "" and str(split / "train") in last
    assert digests(split) == before


# --- the rule, in every script, through links ------------------------------------------------


def test_predict_refuses_to_write_on_or_into_what_it_reads(split, tiny_run, tmp_path):
    predict_py = load_script("lenet", "predict")
    link = tmp_path / "link"
    link.symlink_to(split / "test")  # the same folder under another name
    photo = next((split / "test" / "a").iterdir())
    refused = [
        ("would overwrite", photo, link / "a" / photo.name),  # the photo, through the link
        ("is inside", split / "test" / "a", link / "a" / "figure.png"),
        ("contains", split / "test", split),  # --eval's folder, holding the photos
        ("contains", split / "test", tiny_run.parent),  # holding the checkpoint
    ]
    for where, photos, save in refused:
        flags = ["--eval"] if photos.is_dir() else []
        with pytest.raises(predict_py.UserError, match=f"--save .* {where} .*which the run reads"):
            call(predict_py, photos, "--weights", tiny_run, "--save", save, *flags)
    with pytest.raises(predict_py.UserError, match="--save .* is inside .*test"):
        call(predict_py, link, "--eval", "--weights", tiny_run, "--save", split / "test" / "out")
    assert not (split / "test" / "out").exists()


def test_the_figure_is_checked_under_the_name_it_is_written_as(tiny_run, tmp_path):
    """The figure is named after the first photo (prediction_a.png, cam_a.png): a photo of that
    name among the inputs, beside the checkpoint or in --save's folder, is refused, unchanged."""
    predict_py = load_script("lenet", "predict")
    ck, first = tmp_path / "ck", tmp_path / "a.jpg"
    ck.mkdir()
    (ck / "best.pth").write_bytes(tiny_run.read_bytes())
    first.write_bytes(jpeg_bytes(1, size=(64, 64)))
    for kind, flags in (("prediction", []), ("cam", ["--cam"]), ("prediction", ["--save", ck])):
        photo = ck / f"{kind}_a.png"
        Image.new("RGB", (40, 40), (9, 99, 199)).save(photo)
        before = photo.read_bytes()
        with pytest.raises(predict_py.UserError, match=f"{photo} would overwrite {photo}"):
            call(predict_py, first, photo, "--weights", ck / "best.pth", *flags)
        assert photo.read_bytes() == before
        photo.unlink()


def test_train_refuses_an_output_dir_on_its_data(split, tmp_path):
    train_py = load_script("lenet", "train")
    (tmp_path / "data_link").symlink_to(split)
    for out in (split, split / "train" / "a" / "run", tmp_path / "data_link" / "val", tmp_path):
        with pytest.raises(train_py.UserError, match="--output-dir .*which the run reads"):
            call(train_py, "--data-path", split, "--output-dir", out, *LENET)
    assert not (split / "train" / "a" / "run").exists()


def test_split_data_refuses_a_source_inside_what_it_replaces(split, tmp_path):
    before = digests(split)
    (tmp_path / "link").symlink_to(split / "val")
    for source in (split / "train", tmp_path / "link", split / "test" / "a"):
        result = run("split_data.py", "--source", source, "--out", split)
        assert_one_line_error(result, "split_data.py", "which the split replaces")
    assert digests(split) == before


# --- split_data.py knows its own split -------------------------------------------------------


@pytest.mark.parametrize("manifest", ["{}", "{bad", '{"split_sha256": "0"}', None])
def test_a_hand_made_split_is_never_replaced(tmp_path, manifest):
    """Case 2: train/ + val/ made by hand, with any split.json beside them (or one copied from
    a real split): split_data.py keeps them."""
    photos = make_image_folder(tmp_path / "photos", per_class=10)
    out = make_image_folder(tmp_path / "H" / "train", per_class=3).parent
    make_image_folder(out / "val", per_class=1)
    if manifest is None:  # a real manifest, from another split
        assert run("split_data.py", "--source", photos, "--out", tmp_path / "other").returncode == 0
        manifest = (tmp_path / "other" / "split.json").read_text()
    (out / "split.json").write_text(manifest)
    before = digests(out)
    result = run("split_data.py", "--source", photos, "--out", out)
    assert_one_line_error(result, "split_data.py", "not made by split_data.py", "move them away")
    assert digests(out) == before


def test_its_own_split_is_recognised_and_a_changed_one_kept(split, tmp_path):
    photos = tmp_path / "photos"
    again = run("split_data.py", "--source", photos, "--out", split, "--seed", "3")
    assert again.returncode == 0, again.stderr  # ours, unchanged: replaced
    (split / "train" / "a" / "mine.jpg").write_bytes(jpeg_bytes(1))
    before = digests(split)
    changed = run("split_data.py", "--source", photos, "--out", split)
    assert_one_line_error(changed, "split_data.py", "or changed since")
    assert digests(split) == before


def test_the_digest_is_the_one_earlier_versions_wrote(split):
    """A split made before this change is still recognised: the same file names, the same
    sha256 as build_manifest wrote then (sorted paths under each class and subset)."""
    split_data = load_module(REPO / "split_data.py", "split_data_digest")
    old = hashlib.sha256()
    manifest = json.loads((split / "split.json").read_text())
    for name, counts in manifest["classes"].items():
        for subset in counts:
            for p in sorted((split / subset / name).rglob("*")):
                old.update(
                    f"{subset}/{name}/{p.relative_to(split / subset / name).as_posix()}\n".encode()
                )
    assert manifest["split_sha256"] == old.hexdigest()
    assert split_data.own_split(split)


def test_leftovers_of_earlier_runs_go_and_those_of_a_live_run_stay(split, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftovers = {
        f".D-split-{dead.stdout.strip()}-x1y2": False,  # killed
        ".D-split-abc12345": False,  # an earlier version's name
        f".D-extract-{dead.stdout.strip()}-zz": False,
        f".D-split-{os.getpid()}-live": True,  # this test process: running
        ".Dx-split-1-other": True,  # another --out's
    }
    for name in leftovers:
        (tmp_path / name / "previous" / "train").mkdir(parents=True)
    result = run("split_data.py", "--source", tmp_path / "photos", "--out", split, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert {name: (tmp_path / name).exists() for name in leftovers} == leftovers


def test_an_interrupt_during_the_swap_waits_and_says_the_split_is_whole(
    split, tmp_path, monkeypatch, capsys
):
    split_data = load_module(REPO / "split_data.py", "split_data_late")
    swap_in = split_data.swap_in

    def interrupted_swap(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the split is swapped in
        swap_in(*args)

    monkeypatch.setattr(split_data, "swap_in", interrupted_swap)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(SystemExit) as stop:
        call(split_data, "--source", tmp_path / "photos", "--out", split, "--seed", "5")
    assert stop.value.code == 130
    assert "the new split is whole in" in capsys.readouterr().err
    assert json.loads((split / "split.json").read_text())["seed"] == 5
    assert split_data.own_split(split)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left


def test_split_data_cases_found_by_the_probe(tmp_path, capsys, monkeypatch):
    split_data = load_module(REPO / "split_data.py", "split_data_probe")
    photos = make_image_folder(tmp_path / "photos", per_class=10)
    # 12: a zip made on macOS, with its __MACOSX/ folder
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(photos.rglob("*.jpg")):
            zf.write(p, f"photos/{p.relative_to(photos)}")
            zf.writestr(f"__MACOSX/photos/{p.parent.name}/._{p.name}", b"\0\5\26\7resource fork")
    call(split_data, "--source", archive, "--out", tmp_path / "from_zip")
    assert sorted(p.name for p in (tmp_path / "from_zip" / "train").iterdir()) == ["a", "b", "c"]
    # 16: a class of GIFs only is a class, as the train scripts read GIFs
    from PIL import Image

    (photos / "gifs").mkdir()
    for i in range(4):
        Image.new("P", (20, 20), i).save(photos / "gifs" / f"{i}.gif")
    call(split_data, "--source", photos, "--out", tmp_path / "with_gifs", "--val-ratio", "0.25")
    assert len(list((tmp_path / "with_gifs" / "train" / "gifs").iterdir())) == 3
    shutil.rmtree(photos / "gifs")
    # 20: an old split as --source; the advice for 1- and 2-photo classes can be followed
    with pytest.raises(
        split_data.SplitError, match="is a split .*pass the photos it was made from"
    ):
        call(split_data, "--source", tmp_path / "with_gifs", "--out", tmp_path / "again")
    for extra in ("b", "c"):
        for p in list((photos / extra).iterdir())[2:]:
            p.unlink()  # b and c keep 2 photos
    with pytest.raises(split_data.SplitError, match="pass --val-ratio 0.5 or more") as advice:
        call(split_data, "--source", photos, "--out", tmp_path / "small")
    call(split_data, "--source", photos, "--out", tmp_path / "small", "--val-ratio", "0.5")
    with pytest.raises(
        split_data.SplitError, match="'b' .*has 2 usable image.*needs 3: add images"
    ):
        call(split_data, "--source", photos, "--out", tmp_path / "s3", "--test-ratio", "0.4")
    assert "'b' has only 2 image(s)" in str(advice.value)

    # 20: --link where hard links cannot be made says so, and copies
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(split_data.os, "link", no_links)
    capsys.readouterr()
    call(
        split_data, "--source", photos, "--out", tmp_path / "linked", "--val-ratio", "0.5", "--link"
    )
    assert "note: --link: Invalid cross-device link" in capsys.readouterr().out
    assert (tmp_path / "linked" / "val").is_dir()


# --- train.py owns its output folder ---------------------------------------------------------

TEXT, SLEEP = {"capture_output": True, "text": True}, "import time; time.sleep(60)"


def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_runs_lock_taken(tiny, tmp_path):
    train_py = load_script("lenet", "train")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")  # created by a run that has not yet written its id in it
    with pytest.raises(train_py.UserError, match="another run .process . writes to"):
        call(train_py, "--data-path", tiny, "--output-dir", out, *LENET)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))  # a run going on
        with pytest.raises(
            train_py.UserError, match=f"another run .process {sleeper.pid}. writes to {out}"
        ):
            call(train_py, "--data-path", tiny, "--output-dir", out, *LENET)
        assert list(out.iterdir()) == [out / ".lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    call(train_py, "--data-path", tiny, "--output-dir", out, *LENET)  # killed: its lock is stale
    assert (out / "last.pth").is_file()
    assert (out / ".lock").read_text() == str(os.getpid())  # held until this process exits


def test_a_run_removes_the_temporaries_of_killed_processes_and_keeps_a_live_ones(tmp_path):
    """kill -9 while a checkpoint is written leaves .last.pth.PID.tmp (310 MB after 6 kills of
    AlexNet): the next run into the folder removes those of processes that no longer run."""
    utils = load_script("lenet", "utils")
    out = tmp_path / "run"
    out.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    dead, sleeper = ended.stdout.strip(), subprocess.Popen([sys.executable, "-c", SLEEP])
    kept = [f".prediction_a.png.{sleeper.pid}.tmp", ".notes.tmp"]  # a live one; not ours
    try:
        for name in (f".last.pth.{dead}.tmp", f".best.pth.{dead}.tmp", *kept):
            (out / name).write_bytes(b"x")
        utils.prepare_output_dir(out)
        assert sorted(p.name for p in out.iterdir()) == sorted([".lock", *kept])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_runs_started_together_one_wins_and_the_files_are_its(tiny, tmp_path):
    """Case 4: two train.py runs into one --output-dir at once: one trains, the other is
    refused at start-up (by the lock, or, if the first is already done, by its last.pth)."""
    out = tmp_path / "run"
    args = ["--data-path", tiny, "--output-dir", out, *LENET[2:], "--epochs", "8"]
    command = [sys.executable, str(REPO / "lenet" / "train.py"), *map(str, args)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    runs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 1], [err[-1000:] for _, _, err in results]
    refused = next(err for code, _, err in results if code == 1).strip().splitlines()
    assert len(refused) == 1 and ("another run" in refused[0] or "holds last.pth" in refused[0])
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 8 and len(saved["history"]) == 8
    assert (out / "metrics.csv").read_text().count("\n") == 9
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # lock released


# --- train.py: the rest of the probe ---------------------------------------------------------


def test_resume_with_more_epochs_starts_on_the_new_schedule(tiny, tmp_path, monkeypatch):
    """Case 18: the first step after resuming with a larger --epochs takes the new schedule's
    lr, not the old schedule's last (0.0)."""
    train_py = load_script("lenet", "train")
    out = tmp_path / "run"
    call(train_py, "--data-path", tiny, "--output-dir", out, *LENET[2:], "--epochs", "2")
    seen, train_one_epoch = [], train_py.train_one_epoch

    def first_lr(model, criterion, optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        return train_one_epoch(model, criterion, optimizer, *args)

    monkeypatch.setattr(train_py, "train_one_epoch", first_lr)
    call(
        train_py, "--data-path", tiny, "--output-dir", out, *LENET[2:], "--epochs", "4", "--resume"
    )
    done, total = 2 * 5, 4 * 5  # 18 photos in batches of 4: 5 steps per epoch
    warmup = min(5, total // 5)
    progress = (done - warmup) / (total - warmup)
    assert seen[0] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_an_image_that_turns_unreadable_mid_run_names_the_saved_epoch(tiny, tmp_path, monkeypatch):
    train_py = load_script("lenet", "train")
    out = tmp_path / "run"
    opened, open_rgb = [], train_py.utils.open_rgb

    def turns_corrupt(path, draft=None):
        opened.append(path)
        if len(opened) > 24 + 12:  # the second epoch: 18 train + 6 val per epoch, and then some
            raise ValueError("the image is damaged or truncated (broken data stream)")
        return open_rgb(path, draft)

    monkeypatch.setattr(train_py.utils, "open_rgb", turns_corrupt)
    with pytest.raises(train_py.UserError) as error:
        call(
            train_py,
            "--data-path",
            tiny,
            "--output-dir",
            out,
            *LENET[2:],
            "--epochs",
            "3",
            "--cache",
            "off",
        )
    last = out.resolve() / "last.pth"
    assert f"{last} holds epoch 1; continue with: " in str(error.value)
    assert str(error.value).endswith(f"--resume {last}")


def test_lenet_names_the_one_image_size_it_takes(tiny, tmp_path):
    train_py = load_script("lenet", "train")
    with pytest.raises(
        train_py.UserError, match="--image-size 64: LeNet takes 32 x 32 images only"
    ):
        out = ["--output-dir", tmp_path / "run"]
        call(train_py, "--data-path", tiny, *out, *LENET, "--image-size", "64", "--dry-run")


def test_the_cache_under_a_memory_limit_is_one_line(tiny, tmp_path, monkeypatch):
    """Case 6: auto reads `ulimit -v` and a container's limit; on, out of memory, is one line."""
    import resource

    train_py = load_script("lenet", "train")
    free, (read, write) = train_py.utils.memory_limit(), os.pipe()
    if (child := os.fork()) == 0:  # `ulimit -v 8G` in a copy of this process
        resource.setrlimit(resource.RLIMIT_AS, (2**33, resource.RLIM_INFINITY))
        os.write(write, str(train_py.utils.memory_limit()).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert int(os.read(read, 100)) == min(free, 2**33)

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(train_py.utils.CachedImages, "__init__", out_of_memory)
    with pytest.raises(train_py.UserError, match="do not fit in memory; use --cache off"):
        out = ["--output-dir", tmp_path / "run"]
        call(train_py, "--data-path", tiny, *out, *LENET, "--cache", "on", "--dry-run")


# --- checkpoints ---------------------------------------------------------------------------


def test_bogus_checkpoints_are_one_true_line(tiny_run, tmp_path):
    utils = load_script("lenet", "utils")
    good = torch.load(tiny_run, map_location="cpu", weights_only=True)
    bad = {
        "image_size 0": ({**good, "image_size": 0}, "image_size 0 is not a size"),
        "no mean": ({k: v for k, v in good.items() if k != "mean"}, "not a checkpoint written by"),
        "NaN weights": (
            {**good, "model": {k: v * math.nan for k, v in good["model"].items()}},
            "NaN or infinite weights",
        ),
    }
    for name, (checkpoint, message) in bad.items():
        path = tmp_path / f"{name}.pth"
        torch.save(checkpoint, path)
        with pytest.raises(utils.UserError, match=message):
            utils.load_checkpoint(path, "lenet")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_run.read_bytes()[:1000])
    with pytest.raises(utils.UserError, match="not a checkpoint .damaged, truncated"):
        utils.load_checkpoint(truncated, "lenet")
    folder = tmp_path / "last.pth"
    folder.mkdir()
    with pytest.raises(utils.UserError, match="cannot read checkpoint .*last.pth .Is a directory"):
        utils.load_checkpoint(folder, "lenet")


def test_an_output_folder_with_a_folder_named_last_pth_says_so(tiny, tmp_path):
    train_py = load_script("lenet", "train")
    (tmp_path / "run" / "last.pth").mkdir(parents=True)
    with pytest.raises(train_py.UserError, match=r"holds last.pth \(a folder\): move it away"):
        call(train_py, "--data-path", tiny, "--output-dir", tmp_path / "run", *LENET)


@pytest.mark.parametrize("eval", [True, False])
def test_a_save_folder_that_cannot_be_written_is_refused_before_predicting(
    eval, tiny, tiny_run, tmp_path, monkeypatch
):
    """--eval or a figure beside a checkpoint on a read-only disk, or --save there: refused
    before a photo is read, not after scoring every one."""
    predict_py = load_script("lenet", "predict")
    monkeypatch.setattr(predict_py, "predict", lambda *a: pytest.fail("predicted first"))
    inputs = ["--eval", tiny / "val"] if eval else [tiny / "val" / "a"]
    with small_disk(tmp_path / "ro", "4M") as disk:
        shutil.copy(tiny_run, disk / "best.pth")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for save in ([], ["--save", disk / "figures"]):
            with pytest.raises(predict_py.UserError, match="cannot write in .*Read-only file sys"):
                call(predict_py, *inputs, "--weights", disk / "best.pth", *save)


# --- Ctrl-C while the script starts ---------------------------------------------------------


def test_ctrl_c_while_torch_loads_stops_without_a_traceback():
    """Case 8: the first seconds of predict.py, spent in `import torch`."""
    started = subprocess.Popen(
        [sys.executable, str(REPO / "lenet" / "predict.py"), "photo.jpg"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)
    started.send_signal(signal.SIGINT)
    stdout, stderr = started.communicate(timeout=60)
    assert started.returncode in (-signal.SIGINT, 130), stderr[-2000:]
    assert "Traceback" not in stderr and stdout == ""


def test_an_image_size_beyond_memory_says_so_not_that_it_does_not_fit():
    """Case 10: torch's own allocation failure, for a probe of 2 x 3 x 10^6 x 10^6 floats."""
    utils = load_script("lenet", "utils")
    with pytest.raises(utils.UserError, match="--image-size 1000000 needs more memory than there"):
        utils.check_image_size(torch.nn.Conv2d(3, 4, 3), 10**6, "lenet", torch.device("cpu"))
