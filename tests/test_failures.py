"""Failures as a hostile but realistic user meets them: one clear line, nothing lost.

Every failure must end in one line that names the file or flag and what to do, a non-zero
exit, no half-written file, and the previous good state (split, checkpoints, metrics) intact.
A full disk is a real one where the test may mount a small tmpfs (root on Linux), and a
faked one in-process everywhere.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (
    LENET,
    REPO,
    jpeg_bytes,
    load_module,
    load_script,
    make_image_folder,
    run_script,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run_script(REPO / script, *args, **kwargs)


def assert_one_line_error(result, script: str, *needles: str) -> str:
    assert result.returncode not in (0, 130), result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") or f"{script}: error:" in last, result.stderr
    for needle in needles:
        assert needle in last, last
    return last


def train_refuses(*argv, match: str) -> str:
    """lenet/train.py's main() in this process (no interpreter to start): the UserError it stops
    with, which run_command prints as one line (as the tests of real commands show)."""
    train_py = load_script("lenet", "train")
    with pytest.raises(train_py.UserError, match=match) as error:
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))
    return str(error.value)


def no_temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if "tmp" in p.name or "split-" in p.name]


@contextmanager
def small_disk(path: Path, size: str, read_only: bool = False):
    """A tmpfs of the given size at path: a disk that really fills up."""
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk up to `leave` free bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def split_files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


# --- split_data.py ---------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_image_folder(tmp_path / "photos", per_class=10)


@pytest.fixture
def first_split(photos, tmp_path) -> Path:
    out = tmp_path / "split"
    made = run("split_data.py", "--source", photos, "--out", out)
    assert made.returncode == 0, made.stderr
    return out


def test_a_ratio_that_leaves_train_empty_is_refused_and_the_split_survives(photos, first_split):
    before = split_files(first_split)
    result = run(
        "split_data.py", "--source", photos, "--out", first_split, "--val-ratio", "0.99999999999"
    )
    assert_one_line_error(result, "split_data.py", "none would go to train", "--val-ratio")
    assert split_files(first_split) == before
    assert not no_temporary_files(first_split.parent)


@pytest.mark.parametrize("failing_call", range(1, 7))
def test_a_failure_at_any_step_of_the_swap_puts_the_previous_split_back(
    photos, first_split, monkeypatch, failing_call
):
    split_data = load_module(REPO / "split_data.py", "split_data_swap")
    before = split_files(first_split)
    calls = {"n": 0}
    real_replace = Path.replace

    def flaky_replace(self, target):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", flaky_replace)
    args = split_data.get_args_parser().parse_args(
        ["--source", str(photos), "--out", str(first_split), "--seed", "7"]
    )
    with pytest.raises(split_data.SplitError, match="was left as it was"):
        split_data.main(args)
    monkeypatch.undo()
    assert split_files(first_split) == before
    assert not no_temporary_files(first_split.parent)


def test_out_equal_to_or_inside_the_source_is_refused(photos):
    for out in (photos, photos / "split"):
        result = run("split_data.py", "--source", photos, "--out", out)
        assert_one_line_error(result, "split_data.py", "--out", "outside the source")
    assert sorted(p.name for p in photos.iterdir()) == ["a", "b", "c"]


def test_out_that_cannot_be_a_folder_is_one_line(photos, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, needle in (
        (a_file, "is a file"),
        (a_file / "under", "cannot be created"),
        (Path("/proc/no_such_folder"), "cannot be created"),
    ):
        result = run("split_data.py", "--source", photos, "--out", out)
        assert_one_line_error(result, "split_data.py", str(out), needle)


def test_disk_full_during_a_resplit_keeps_the_previous_split(tmp_path):
    photos = tmp_path / "photos"
    for c, name in enumerate(("a", "b", "c")):
        (photos / name).mkdir(parents=True)
        for i in range(10):
            (photos / name / f"{i}.jpg").write_bytes(jpeg_bytes(c * 20 + i, size=(400, 300)))
    with small_disk(tmp_path / "disk", "2m") as disk:
        out = disk / "split"
        assert run("split_data.py", "--source", photos, "--out", out).returncode == 0
        before = split_files(out)
        fill(disk, leave=20_000)  # room for a few photos, not for a second split
        result = run("split_data.py", "--source", photos, "--out", out, "--seed", "3")
        assert_one_line_error(result, "split_data.py", "no space left", "left as it was")
        assert split_files(out) == before
        assert not no_temporary_files(disk)


# --- train.py: the data ----------------------------------------------------------------------


def test_a_one_class_dataset_is_refused(tmp_path):
    for split in ("train", "val"):
        make_image_folder(tmp_path / "one" / split, classes=("only",), per_class=4)
    argv = ["--data-path", tmp_path / "one", "--output-dir", tmp_path / "o", *LENET]
    train_refuses(*argv, match=r"two or more classes \(\['only'\]")


def test_an_empty_class_folder_in_val_says_it_is_val(tiny, tmp_path):
    for image in (tiny / "val" / "b").iterdir():
        image.unlink()
    train_refuses("--data-path", tiny, "--output-dir", tmp_path / "o", *LENET, match=f"{tiny}/val")


# --- train.py: flags and the output folder ---------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "nan"], "argument --lr: nan is not in"),
        (["--lr", "-1"], "argument --lr: -1 is not in"),
        (["--wd", "nan"], "argument --weight-decay/--wd: nan is not in"),
        (["--epochs", "0"], "argument --epochs: 0 is not in"),
        (
            ["--seed", "99999999999999999999999"],
            "argument --seed: 99999999999999999999999 is not in",
        ),
    ],
)
def test_impossible_numbers_are_one_line(capsys, flags, needle):
    with pytest.raises(SystemExit):
        load_script("lenet", "train").get_args_parser().parse_args(flags)
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("device", ["meta", "xpu", "cuda:x"])
def test_impossible_devices_are_one_line(device):
    utils = load_script("lenet", "utils")
    with pytest.raises(utils.UserError, match=f"--device {device}: "):
        utils.pick_device(device)


def test_an_unusable_output_dir_is_refused_before_training(tiny, tmp_path, capsys):
    train_py = load_script("lenet", "train")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (Path("/proc/no_such_folder"), a_file, a_file / "under"):
        args = train_py.get_args_parser().parse_args(
            ["--data-path", str(tiny), "--output-dir", str(out), *LENET]
        )
        with pytest.raises(train_py.UserError, match="--output-dir"):
            train_py.main(args)
        assert "epoch 1/1" not in capsys.readouterr().out
    assert a_file.read_text() == "keep me"


def test_a_read_only_output_dir_is_refused_before_training(tiny, tmp_path):
    with small_disk(tmp_path / "ro", "1m", read_only=True) as disk:
        argv = ["--data-path", tiny, "--output-dir", disk, *LENET]
        train_refuses(*argv, match="--output-dir .* cannot be written")


# --- train.py: a full disk -------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    utils = load_script("lenet", "utils")
    with small_disk(tmp_path / "disk", "1m") as disk:
        path = disk / "metrics.csv"
        path.write_text("the previous epochs\n")
        fill(disk, leave=0)

        def plain_write(f):
            f.write(b"the new metrics" * 1000)

        def like_torch_save(f):  # torch.save reports its file's failed write as a RuntimeError
            try:
                plain_write(f)
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

        for writer in (plain_write, like_torch_save):
            with pytest.raises(utils.UserError, match=f"cannot write {disk}/.* .No space left on"):
                utils.write_file(path, writer)
            assert path.read_text() == "the previous epochs\n"
            assert not no_temporary_files(disk)
    path = tmp_path / "metrics.csv"

    def read_only(f):
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(utils.UserError, match="cannot write .*Read-only file system"):
        utils.write_file(path, read_only)

    def a_bug(f):  # not a failed write: a traceback, as for any other bug
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        utils.write_file(path, a_bug)


def test_ctrl_c_while_torch_save_writes_is_a_ctrl_c_and_keeps_the_old_file(tmp_path):
    """torch.save turns a Ctrl-C in its file's write into a RuntimeError (its zip writer ends
    the file on the way out, and fails): write_file hands on the Ctrl-C, for the run to report
    what is saved, instead of a traceback."""
    utils = load_script("lenet", "utils")
    path = tmp_path / "last.pth"
    path.write_bytes(b"the previous epoch")

    class CtrlCAtTheSecondWrite:
        def __init__(self, f) -> None:
            self.f, self.writes = f, 0

        def write(self, data) -> int:
            self.writes += 1
            if self.writes == 2:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    state = {"weights": torch.zeros(1000, 100)}
    with pytest.raises(KeyboardInterrupt):
        utils.write_file(path, lambda f: torch.save(state, CtrlCAtTheSecondWrite(f)))
    assert path.read_bytes() == b"the previous epoch" and not no_temporary_files(tmp_path)


def test_disk_full_while_writing_metrics_keeps_the_old_ones(tmp_path):
    utils = load_script("lenet", "utils")
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5}
    row |= {"lr": 1e-3, "seconds": 1.0, "img_s": 10.0, "data_wait": 0.1}
    with small_disk(tmp_path / "disk", "1m") as disk:
        utils.log_epoch([row], 2, disk)
        before = (disk / "metrics.csv").read_text()
        fill(disk, leave=0)
        with pytest.raises(utils.UserError, match="No space left on device"):
            utils.log_epoch([row, {**row, "epoch": 2}] * 2000, 2, disk)
        assert (disk / "metrics.csv").read_text() == before
        assert not no_temporary_files(disk)


def test_disk_full_while_saving_a_checkpoint_says_so_and_keeps_the_last_epoch(tiny, tmp_path):
    # LeNet's epoch writes best.pth (0.5 MB) and last.pth (1.5 MB): 3 MB hold one epoch, and
    # the next one's temporary last.pth no longer fits beside it.
    with small_disk(tmp_path / "disk", "3m") as disk:
        out = disk / "run"
        result = run(
            "lenet/train.py", "--data-path", tiny, "--output-dir", out, *LENET[:1], "3", *LENET[2:]
        )
        last = assert_one_line_error(result, "lenet/train.py", "No space left on", "epoch 1")
        assert "--resume" in last
        saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
        assert saved["epoch"] == 1
        assert not no_temporary_files(out)


# --- train.py: resume and interrupt ----------------------------------------------------------


def test_resume_with_no_epoch_left_or_a_changed_recipe_says_so(tiny, tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run.parent, out)  # one epoch of LeNet
    train_py = load_script("lenet", "train")

    def main(*argv):
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))

    with pytest.raises(train_py.UserError, match="already trained 1 epochs: pass more --epochs"):
        main("--data-path", tiny, "--output-dir", out, *LENET, "--resume")
    main(
        "--data-path",
        tiny,
        "--output-dir",
        out,
        *LENET[2:],
        "--epochs",
        "2",
        "--lr",
        "0.5",
        "--resume",
    )
    assert "--lr 0.5 is ignored" in capsys.readouterr().out
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["args"]["lr"] == pytest.approx(2e-3)


def ctrl_c_as_in_a_terminal() -> None:
    """Runs in the child before its program: a shell starts background jobs (tests run in the
    background, say) with SIGINT ignored, and children inherit that; Python then ignores it too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# SIGTERM (a `kill`, a job scheduler) in the setup, Ctrl-C into the first epoch
@pytest.mark.parametrize("signum, wait", [(signal.SIGTERM, 0.0), (signal.SIGINT, 1.0)])
def test_ctrl_c_before_the_first_saved_epoch_exits_130(flowers, tmp_path, signum, wait):
    cmd = [
        sys.executable,
        str(REPO / "resnet" / "train.py"),
        "--data-path",
        str(flowers),
        "--arch",
        "resnet18",
        "--image-size",
        "64",
        "-b",
        "8",
        "--workers",
        "0",
        "--output-dir",
        str(tmp_path / "o"),
    ]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    for line in proc.stdout:  # the start line: training begins right after it
        if "classes" in line:
            break
    time.sleep(wait)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o" / "last.pth").exists()


# Installed through PYTHONPATH (sitecustomize), Ctrl-C lands in a tqdm progress bar's
# constructor, the worst moment: tqdm sets `disable` early and `pos` later, and its cleanup
# reads both.
CTRL_C_IN = {
    "constructor": """
import tqdm.std

def interrupted(self, *args, **kwargs):
    self.disable = False
    raise KeyboardInterrupt

tqdm.std.tqdm.__init__ = interrupted
""",
}


@pytest.mark.parametrize("where", CTRL_C_IN)
def test_ctrl_c_inside_a_progress_bar_stops_the_script_in_one_line(where, tiny, tiny_run, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CTRL_C_IN[where])
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path}
    runs = {
        "lenet/train.py": run(
            "lenet/train.py",
            "--data-path",
            tiny,
            *LENET,
            "--output-dir",
            tmp_path / "again",
            env=env,
        ),
        "lenet/predict.py": run(
            "lenet/predict.py",
            tiny / "val",
            "--weights",
            tiny_run,
            "--save",
            tmp_path / "p.png",
            env=env,
        ),
    }
    runs["split_data.py"] = run(
        "split_data.py", "--source", tiny / "train", "--out", tmp_path / "split", env=env
    )
    for script, result in runs.items():
        assert result.returncode == 130, f"{script}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, f"{script}: {result.stderr[-2000:]}"
        last = result.stderr.strip().splitlines()[-1]
        assert "interrupted" in last, f"{script}: {result.stderr[-2000:]}"


# --- large photos ----------------------------------------------------------------------------


def test_large_photos_are_accepted_as_pillow_accepts_them(tiny_run, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (10_000, 10_000), (200, 40, 40)).save(big)  # 100 MP: Pillow only warns
    utils = load_script("lenet", "utils")
    assert utils.load_image(str(big)).size == (10_000, 10_000)
    jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (40, 200, 40)).save(jpeg, quality=80)
    drafted = utils.load_image(str(jpeg), draft=512)
    assert 512 <= min(drafted.size) < 3000  # decoded at a reduced scale, still large enough

    result = run("lenet/predict.py", big, "--weights", tiny_run, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [Path(r["file"]).name for r in json.loads(result.stdout)] == ["big.png"]


# --- predict.py --save -----------------------------------------------------------------------


def test_predict_save_paths(tiny_run, tmp_path):
    predict_py = load_script("lenet", "predict")
    with pytest.raises(
        predict_py.UserError, match="fig.xyz: matplotlib cannot write .xyz files; use .*.png"
    ):
        predict_py.check_save_path(tmp_path / "fig.xyz", folder=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(predict_py.UserError, match=f"cannot write in {a_file} .Not a directory"):
        predict_py.check_writable(a_file / "fig.png", False, "--save")
    with pytest.raises(predict_py.UserError, match="cannot write .pgf files"):  # LaTeX's
        predict_py.check_save_path(tmp_path / "fig.pgf", folder=False)
    with pytest.raises(predict_py.UserError, match="with --eval it names a folder"):
        predict_py.check_save_path(a_file, folder=True)
    assert predict_py.check_save_path(tmp_path / "bare", folder=False) == tmp_path / "bare.png"

    photo = tiny_run.parent.parent / "tiny" / "val" / "a" / "0.jpg"
    with pytest.raises(predict_py.UserError, match="fig.xyz: matplotlib cannot write"):
        predict_py.main(predict_py.get_args_parser().parse_args([str(photo), "--save", "fig.xyz"]))
    folder = tmp_path / "figures"
    folder.mkdir()
    into = run("lenet/predict.py", photo, "--weights", tiny_run, "--save", folder)
    assert into.returncode == 0, into.stderr
    saved = folder / "prediction_0.png"
    assert saved.read_bytes()[:4] == b"\x89PNG"
    assert into.stdout.strip().endswith(f"figure saved to {saved}")


# --- class names in any script ---------------------------------------------------------------


def test_class_names_without_a_font_warn_once_at_most(tiny_run, tmp_path):
    """A checkpoint of Chinese class names (tiny_run's, renamed: train.py never draws them)."""
    zh = ["雏菊", "蒲公英", "玫瑰"]
    make_image_folder(tmp_path / "zh" / "val", zh, per_class=2)
    weights = tmp_path / "o" / "best.pth"
    weights.parent.mkdir()
    torch.save({**torch.load(tiny_run, weights_only=True), "classes": zh}, weights)
    scored = run("lenet/predict.py", tmp_path / "zh" / "val", "--eval", "--weights", weights)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "Glyph" not in scored.stderr
    assert scored.stderr.count("note: no installed font") <= 1
    assert (tmp_path / "o" / "eval_val" / "confusion_matrix.png").is_file()


def test_an_installed_cjk_font_becomes_the_fallback(monkeypatch, capsys):
    from matplotlib import font_manager, rcParams

    monkeypatch.setitem(rcParams, "font.family", rcParams["font.family"])
    utils = load_script("lenet", "utils")
    fonts = font_manager.fontManager.ttflist
    cjk = font_manager.FontEntry(fname=fonts[0].fname, name="Noto Sans CJK SC")
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [*fonts, cjk])
    utils.use_fonts_for(["雏菊", "玫瑰"])
    assert rcParams["font.family"] == ["DejaVu Sans", "Noto Sans CJK SC"]
    assert capsys.readouterr().err == ""  # drawn: nothing to say
    monkeypatch.setattr(font_manager.fontManager, "ttflist", fonts)
    utils.use_fonts_for(["雏菊", "玫瑰"])
    assert rcParams["font.family"] == ["DejaVu Sans"]
    assert capsys.readouterr().err.startswith("note: no installed font has the characters 玫瑰菊雏")


# --- the copy script -------------------------------------------------------------------------


def test_sync_shared_copies_resnets_shared_code_to_the_other_folders(tmp_path):
    families = ("lenet", "alexnet", "vgg", "googlenet", "resnet")
    scripts = ("train.py", "predict.py", "utils.py")
    for name in ("tests/sync_shared.py", *(f"{f}/{s}" for f in families for s in scripts)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    script = tmp_path / "tests" / "sync_shared.py"
    resnet = tmp_path / "resnet" / "train.py"
    text = resnet.read_text()
    text = text.replace('    """Loss and accuracy of the main head', '    """Changed: loss', 1)
    text = text.replace(
        "def save_epoch(", "def new_helper() -> int:\n    return 1\n\n\ndef save_epoch(", 1
    )
    resnet.write_text(text)
    stale = tmp_path / "alexnet" / "predict.py"  # a shared definition resnet/ no longer has
    old = "def old_helper():\n    pass\n\n\ndef score("
    stale.write_text(stale.read_text().replace("def score(", old, 1))
    (tmp_path / "resnet" / "utils.py").write_text(
        (REPO / "resnet/utils.py").read_text() + "# new\n"
    )

    check = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert "lenet/train.py" in check.stdout and "alexnet/predict.py" in check.stdout
    assert "googlenet/utils.py" in check.stdout
    assert "vgg/predict.py" not in check.stdout
    subprocess.run([sys.executable, script], check=True, capture_output=True)
    again = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout
    for family in ("lenet", "alexnet", "vgg", "googlenet"):
        synced = (tmp_path / family / "train.py").read_text()
        assert '"""Changed: loss' in synced and "def new_helper() -> int:" in synced
        assert synced.index("def new_helper") < synced.index("def save_epoch")
        assert (tmp_path / family / "utils.py").read_text().endswith("# new\n")
        assert f'FAMILY = "{family}"' in synced  # the folder's own parts stay its own
    assert "def load_image_folders(" in (tmp_path / "lenet" / "train.py").read_text()
    assert "def load_datasets(" in (tmp_path / "lenet" / "train.py").read_text()  # lenet's own
    assert "old_helper" not in stale.read_text() and "def score(" in stale.read_text()
