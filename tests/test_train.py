"""train.py in every folder: end to end on the real sample, one contract, resume, bad input."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (
    FAMILIES,
    REPO,
    SAMPLE_EPOCHS,
    SMALL,
    jpeg_bytes,
    load_module,
    load_script,
    run_script,
    val_accuracy_of,
)
from sync_shared import shared_definitions

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  train_loss [\d.]+  train_acc [\d.]+  val_loss [\d.]+  "
    r"val_acc ([\d.]+)  lr [\d.e+-]+  \d+s  \d+ img/s  data_wait \d+%(  gpu_mem [\d.]+ GiB)?$"
)


def train(family: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run_script(REPO / family / "train.py", *args, **kwargs)


def assert_one_line_error(result, *needles):
    assert result.returncode not in (0, 130), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "/train.py: error:" in last, result.stderr
    for needle in needles:
        assert needle in last, last


def refused(family: str, *argv, match: str) -> str:
    """Run family's train.py main() in this process (no interpreter to start) and return the
    UserError it stops with; as a command, run_command prints it as one line (tested below)."""
    train_py = load_script(family, "train")
    with pytest.raises(train_py.UserError, match=match) as error:
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))
    return str(error.value)


def load_model_module(family: str):
    return load_module(REPO / family / "model.py", f"{family}_model_for_train_tests")


def build_from_checkpoint(family: str, checkpoint: dict) -> torch.nn.Module:
    module = load_model_module(family)
    n = len(checkpoint["classes"])
    if family == "lenet":
        return module.LeNet(num_classes=n)
    if family == "alexnet":
        return module.AlexNet(num_classes=n)
    if family == "googlenet":
        return module.GoogLeNet(num_classes=n, aux_logits=True)
    return module.ARCHS[checkpoint["arch"]](num_classes=n)


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_end_to_end_on_the_sample_and_writes_every_output(family, flowers, sample_runs):
    result, out = sample_runs[family]
    epochs = SAMPLE_EPOCHS[family]
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p.name for p in out.iterdir() if not p.name.startswith("prediction_")]
    assert sorted(written) == [  # predict.py's tests add their figures beside the checkpoint
        "best.pth",
        "curves.png",
        "last.pth",
        "metrics.csv",
    ]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epoch_lines = [m for m in map(EPOCH_LINE.match, result.stdout.splitlines()) if m]
    assert [m.group(1, 2) for m in epoch_lines] == [
        (str(e), str(epochs)) for e in range(1, epochs + 1)
    ]
    assert "best val_acc" in result.stdout.splitlines()[-1]

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    columns = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert set(rows[0]) == columns | {"img_s", "data_wait"}
    assert all(0 <= float(r["data_wait"]) <= 1 for r in rows)
    logged = [float(m.group(3)) for m in epoch_lines]
    assert [float(r["val_acc"]) for r in rows] == pytest.approx(logged, abs=1e-3)

    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    classes = sorted(p.name for p in (flowers / "train").iterdir())
    assert best["family"] == family and best["classes"] == classes
    assert best["image_size"] == int(SMALL[family][-1])
    assert {"optimizer", "scheduler", "scaler", "history"} <= set(last)
    assert "rng" not in last  # seeded per epoch and image: a saved random state would be dead
    assert best["epoch"] == epochs and all(
        torch.equal(best["model"][k], last["model"][k]) for k in best["model"]
    )
    model = build_from_checkpoint(family, best)
    model.load_state_dict(best["model"], strict=True)

    if family in ("lenet", "resnet"):  # without and with batch norm
        # The saved checkpoint reproduces the logged accuracy.
        checked = val_accuracy_of(family, out / "best.pth", flowers, *SMALL[family])
        assert checked == pytest.approx(last["history"][-1]["val_acc"], abs=1e-4)


def test_amp_off_and_default_both_learn(flowers, tmp_path):
    train_py, losses = load_script("resnet", "train"), {}
    for amp in ("off", "auto"):  # in this process: no interpreter to start
        argv = ["--data-path", flowers, "--epochs", "3", "--amp", amp, "--workers", "0"]
        argv += ["--output-dir", tmp_path / amp, *SMALL["resnet"]]
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))
        with open(tmp_path / amp / "metrics.csv") as f:
            losses[amp] = [float(r["train_loss"]) for r in csv.DictReader(f)]
    for amp, curve in losses.items():
        assert curve[-1] < curve[0] - 0.1, (amp, curve)


# --- resume and interrupt --------------------------------------------------------------------


def weights_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_interrupt_then_resume_gives_the_same_weights_as_a_straight_run(flowers, tmp_path):
    common = ["--data-path", flowers, "--epochs", "2", "--workers", "0", *SMALL["resnet"]]
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}  # the two runs side by side
    with ThreadPoolExecutor(1) as pool:
        straight = pool.submit(
            train, "resnet", *common, "--output-dir", tmp_path / "straight", env=env
        )
        out = tmp_path / "interrupted"
        cmd = [
            sys.executable,
            str(REPO / "resnet" / "train.py"),
            *map(str, common),
            "--output-dir",
            str(out),
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        deadline = time.monotonic() + 300
        while not (out / "last.pth").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # in epoch 2 (or later: the result must not depend on it)
        stdout, stderr = proc.communicate(timeout=300)
        straight = straight.result()
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "Traceback" not in stderr
    if proc.returncode == 130:
        assert "continue with:" in stderr and "--resume" in stderr
        assert not list(out.glob(".*.tmp*")), "a half-written file was left behind"
    else:
        assert proc.returncode == 0, stderr[-3000:]  # finished before the signal landed

    resumed = train("resnet", *common, "--output-dir", out, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights_of(tmp_path / "straight" / "last.pth"), weights_of(out / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(out / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


def test_sigterm_keeps_the_last_epoch_and_prints_the_resume_command(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "lenet" / "train.py"),
        "--data-path",
        str(tiny),
        "--epochs",
        "400",
        "--workers",
        "0",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    deadline = time.monotonic() + 120
    while not (out / "last.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert f"holds epoch {saved['epoch']}" in stderr
    assert "--resume" in stderr.strip().splitlines()[-1]


def test_every_epoch_is_written_and_an_interrupt_names_the_epoch_last_pth_holds(
    tiny, tmp_path, monkeypatch, capsys
):
    train_py = load_script("lenet", "train")
    written, write = [], train_py.utils.write_file
    monkeypatch.setattr(
        train_py.utils, "write_file", lambda path, f: (written.append(path.name), write(path, f))
    )
    one_epoch = train_py.train_one_epoch

    def interrupted_in_epoch_4(*args):
        if args[-3] == 4:  # train_one_epoch(model, ..., epoch, args, run)
            raise KeyboardInterrupt
        return one_epoch(*args)

    monkeypatch.setattr(train_py, "train_one_epoch", interrupted_in_epoch_4)
    out = tmp_path / "run"
    argv = ["--data-path", str(tiny), "--workers", "0", "--output-dir", str(out), "--epochs", "6"]
    with pytest.raises(SystemExit) as stop:
        train_py.main(train_py.get_args_parser().parse_args(argv))
    assert stop.value.code == 130
    epoch = ["metrics.csv", "curves.png", "best.pth", "last.pth"]
    assert written == epoch * 3  # every file of every epoch, last.pth last
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 3
    stderr = capsys.readouterr().err
    assert f"interrupted in epoch 4; {out.resolve() / 'last.pth'} holds epoch 3;" in stderr
    assert stderr.strip().splitlines()[-1].endswith(f"--resume {out.resolve() / 'last.pth'}")


def test_a_resumed_runs_commands_name_the_resume_flag_once(monkeypatch):
    utils = load_script("resnet", "utils")
    argv = ["resnet/train.py", "-b", "8", "--resume", "/a/last.pth", "--epochs=3", "--lr", "1e-3"]
    monkeypatch.setattr(sys, "argv", argv)
    changed = utils.command_with({"--resume": "/b/last.pth", "--batch-size": "4"})
    assert (
        changed == "python resnet/train.py --epochs=3 --lr 1e-3 --resume /b/last.pth --batch-size 4"
    )
    monkeypatch.setattr(sys, "argv", ["resnet/train.py", "--resume", "--lr", "1e-3"])  # no value
    assert utils.command_with({"--resume": "x"}) == "python resnet/train.py --lr 1e-3 --resume x"


@pytest.mark.parametrize("seconds_per_call, noted", [(1000.0, True), (None, False)])
def test_a_cpu_run_of_over_an_hour_says_so_in_its_first_epoch_with_a_quicker_command(
    tiny, tmp_path, monkeypatch, capsys, seconds_per_call, noted
):
    """The epoch's clock advanced by seconds_per_call at every reading (a slow CPU), or real."""
    train_py = load_script("resnet", "train")
    if seconds_per_call:
        clock = iter(range(1, 10**6))
        fake_time = type("Time", (), {"perf_counter": lambda: next(clock) * seconds_per_call})
        monkeypatch.setattr(train_py.utils, "time", fake_time)
    argv = [
        "--data-path",
        str(tiny),
        "--output-dir",
        str(tmp_path / "o"),
        "--epochs",
        "2",
        "-b",
        "4",
    ]
    argv += ["--workers", "0", "--device", "cpu", "--arch", "resnet18", "--image-size", "32"]
    monkeypatch.setattr(sys, "argv", ["resnet/train.py", *argv])
    train_py.main(train_py.get_args_parser().parse_args(argv))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == noted  # once, in epoch 1, or never
    if noted:
        assert re.search(
            r"note: on the CPU this run takes about \d+ (h|min) \(\d+ min per epoch", notes[0]
        )
        kept = " ".join(argv[:12])  # all but --arch and --image-size, which change
        assert notes[0].endswith(
            f"run: python resnet/train.py {kept} --arch resnet18 --image-size 64"
        )


# --- one contract in five files --------------------------------------------------------------


def help_flags(family: str) -> dict[str, str]:
    text = load_script(family, "train").get_args_parser().format_help()
    options = text.split("options:", 1)[1]
    flags, current = {}, None
    for line in options.splitlines():
        match = re.match(r"^  (-[\w-]+(?:[ ,=][^ ]+)*?)(?:  +|$)(.*)", line)
        if match and line.startswith("  -"):
            names = re.findall(r"--?[\w-]+", match.group(1))
            current = max(names, key=len)
            flags[current] = match.group(2)
        elif current and line.strip():
            flags[current] += " " + line.strip()
    return flags


def test_the_five_scripts_share_the_same_core_flags_and_state_defaults():
    core = {
        "--data-path",
        "--epochs",
        "--batch-size",
        "--lr",
        "--weight-decay",
        "--workers",
        "--device",
        "--amp",
        "--image-size",
        "--seed",
        "--output-dir",
        "--resume",
        "--dry-run",
        "--compile",
        "--cache",
        "--sync-bn",
        "--accum-steps",
        "--label-smoothing",
        "--augment",
        "--crop-scale",
    }
    family_flags = {
        "lenet": {"--dataset"},
        "alexnet": set(),
        "googlenet": set(),
        "vgg": {"--arch", "--weights", "--freeze-backbone"},
        "resnet": {"--arch", "--weights", "--freeze-backbone"},
    }
    for family in FAMILIES:
        flags = help_flags(family)
        assert set(flags) - {"--help"} == core | family_flags[family], family
        for flag, text in flags.items():
            if flag != "--help":
                assert "default" in text, f"{family} {flag} does not state its default"


def test_shared_functions_are_identical_in_the_five_files():
    reference = shared_definitions("resnet", "train.py")
    # A sanity check of the list itself: the loops and the checkpoint code are in it.
    assert {"train_one_epoch", "evaluate", "main", "load_datasets", "__main__"} <= set(reference)
    for family in FAMILIES:
        theirs = shared_definitions(family, "train.py")
        differing = [n for n in {*reference, *theirs} if theirs.get(n) != reference.get(n)]
        assert differing == [], (
            f"{family}/train.py differs from resnet/train.py in {differing}: edit resnet's, "
            f"then run `python tests/sync_shared.py`"
        )


# --- bad input -------------------------------------------------------------------------------


def test_missing_data_folder_says_to_run_split_data(tmp_path):
    result = train("alexnet", "--data-path", tmp_path / "nowhere", "--output-dir", tmp_path / "o")
    assert_one_line_error(result, "split_data.py")  # as a command: one line


def test_train_and_val_with_different_classes(tiny, tmp_path):
    (tiny / "val" / "c").rename(tiny / "val" / "z")
    out = tmp_path / "o"
    refused(
        "lenet", "--data-path", tiny, "--output-dir", out, match="train/ and val/ need the same"
    )


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_is_named(tiny, tmp_path, workers):
    good = jpeg_bytes(1, size=(300, 200))
    (tiny / "train" / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])
    result = train(
        "lenet",
        "--data-path",
        tiny,
        "--epochs",
        "1",
        "--workers",
        workers,
        "--cache",  # read by the loader's workers (the cache decodes in this process)
        "off",
        "--output-dir",
        tmp_path / "o",
    )
    assert_one_line_error(result, "broken.jpg", "no epoch was saved yet")


def test_image_size_too_small_for_the_network(tiny, tmp_path):
    argv = ["--data-path", tiny, "--image-size", "32", "--output-dir", tmp_path / "o"]
    refused("googlenet", *argv, match="--image-size 32 does not fit googlenet")


def test_diverging_loss_stops_with_the_epoch(tiny, tmp_path):
    argv = ["--data-path", tiny, "--lr", "1e30", "--epochs", "3", "-b", "4", "--workers", "0"]
    refused(
        "lenet",
        *argv,
        "--output-dir",
        tmp_path / "o",
        match="in epoch 1: training diverged.* lower --lr",
    )


def test_the_last_partial_batch_trains_unless_it_is_a_single_image(tiny, tmp_path):
    flags = ["--epochs", "1", "-b", "8", "--device", "cpu", "--workers", "0", "--data-path", tiny]
    train_py, steps = load_script("lenet", "train"), {}
    for n in (18, 17):  # 8 + 8 + 2 images, then 8 + 8 + 1 (a lone image cannot be normalised)
        if n == 17:
            (tiny / "train" / "a" / "0.jpg").unlink()
        argv = [*map(str, flags), "--output-dir", str(tmp_path / str(n))]
        train_py.main(train_py.get_args_parser().parse_args(argv))  # in this process: faster
        state = torch.load(tmp_path / str(n) / "last.pth", weights_only=True)
        steps[n] = state["scheduler"]["last_epoch"]
    assert steps == {18: 3, 17: 2}


def test_best_pth_keeps_the_last_epoch_and_the_report_names_the_best(tiny, tmp_path, capsys):
    flags = ["--epochs", "4", "--device", "cpu", "--workers", "0", "-b", "4", "--lr", "1e-2"]
    train_py = load_script("lenet", "train")
    argv = [*flags, "--data-path", str(tiny), "--output-dir", str(tmp_path / "run")]
    train_py.main(train_py.get_args_parser().parse_args(argv))
    stdout = capsys.readouterr().out
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    with open(tmp_path / "run" / "metrics.csv") as f:
        val = [float(row["val_acc"]) for row in csv.DictReader(f)]
    assert best["epoch"] == 4 and "optimizer" not in best
    assert f"epoch {val.index(max(val)) + 1}/4" in stdout.splitlines()[-1]  # the earliest


def textured_split(root: Path) -> Path:
    """A 3-class train/val split of noise photos: unlike one-colour photos, every crop differs."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2)):
        for name in ("a", "b", "c"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (72, 80, 3), dtype=torch.uint8, generator=gen)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


def test_label_smoothing_and_augmentation_reach_training_and_stay_on_resume(tmp_path):
    tiny = textured_split(tmp_path / "textured")
    flags = ["--device", "cpu", "--amp", "off", "--workers", "0", "-b", "6", "--data-path", tiny]
    runs = {
        "plain": [],
        "smoothed": ["--label-smoothing", "0.5"],
        "cropped": ["--crop-scale", "0.5"],
        "all": ["--label-smoothing", "0.5", "--augment", "trivialaugment", "--crop-scale", "0.5"],
    }
    train_py = load_script("lenet", "train")  # in this process: five runs, one import

    def run(*argv):
        train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))

    for name, extra in runs.items():
        run(*flags, "--epochs", "1", "--output-dir", tmp_path / name, *extra)
    run(*flags, "--epochs", "2", "--output-dir", tmp_path / "all", "--resume")
    resumed = torch.load(tmp_path / "all" / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2
    recipe = resumed["args"]
    assert (recipe["label_smoothing"], recipe["augment"], recipe["crop_scale"]) == (
        0.5,
        "trivialaugment",
        0.5,
    )
    # Same seed and images, one flag apart from plain: a different loss shows it reached training.
    first_loss = {
        name: torch.load(tmp_path / name / "last.pth", weights_only=True)["history"][0][
            "train_loss"
        ]
        for name in ("plain", "smoothed", "cropped")
    }
    assert first_loss["plain"] != first_loss["smoothed"]
    assert first_loss["plain"] != first_loss["cropped"]
    build_transforms = load_script("lenet", "train").build_transforms
    pipelines = {
        augment: build_transforms(32, augment, 0.5)[0].transforms
        for augment in ("crop-flip", "trivialaugment")
    }
    names = {augment: [type(t).__name__ for t in steps] for augment, steps in pipelines.items()}
    assert (
        "TrivialAugmentWide" in names["trivialaugment"]
        and "RandomErasing" in names["trivialaugment"]
    )
    assert not {"TrivialAugmentWide", "RandomErasing"} & set(names["crop-flip"])
    assert [steps[0].scale for steps in pipelines.values()] == [(0.5, 1.0)] * 2


@pytest.mark.parametrize(
    "flag, value, message",
    [
        *(("--label-smoothing", v, f"{v} is not in [0, 1)") for v in ("1", "-0.1", "nan")),
        *(("--crop-scale", v, f"{v} is not in (0, 1]") for v in ("0", "1.5", "nan")),
    ],
)
def test_label_smoothing_and_crop_scale_out_of_range_are_one_line(capsys, flag, value, message):
    parser = load_script("lenet", "train").get_args_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([flag, value])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"lenet/train.py: error: argument {flag}: {message}"


def test_a_bad_number_is_one_line_from_the_command_line(tmp_path):
    result = train("lenet", "--lr", "0", "--output-dir", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "lenet/train.py: error: argument --lr: 0 is not in (0, inf]"
    )


def test_resume_from_another_model_or_dataset_is_refused(tiny, tiny_run, tmp_path):
    last = tiny_run.parent / "last.pth"
    argv = ["--data-path", tiny, "--output-dir", tmp_path / "b", "--resume", last]
    refused("alexnet", *argv, "--image-size", "64", match="of the lenet folder.* use lenet/")
    (tiny / "train" / "c").rename(tiny / "train" / "d")
    (tiny / "val" / "c").rename(tiny / "val" / "d")
    refused("lenet", *argv, "--epochs", "2", "--workers", "0", match="for the classes")


def test_a_batch_of_one_is_refused_where_batch_norm_trains(tiny, tmp_path):
    """resnet18 at 32 pixels, -b 1: "Expected more than 1 value per channel" was a traceback."""
    argv = ["--data-path", tiny, "--output-dir", tmp_path / "r", "--epochs", "1", "-b", "1"]
    argv += ["--workers", "0", "--dry-run", "--arch", "resnet18", "--image-size", "32"]
    refused("resnet", *argv, match="--batch-size 1: resnet18's batch norm needs 2 or more images")
    lenet = ["--data-path", tiny, "--output-dir", tmp_path / "l", "--epochs", "1", "-b", "1"]
    train_py = load_script("lenet", "train")  # no batch norm: a batch of one trains
    train_py.main(
        train_py.get_args_parser().parse_args(map(str, [*lenet, "--workers", "0", "--dry-run"]))
    )


def test_a_finished_run_is_not_overwritten(tiny, tiny_run, tmp_path):
    before = tiny_run.read_bytes()
    argv = ["--data-path", tiny, "--epochs", "1", "--output-dir", tiny_run.parent]
    refused(
        "lenet",
        *argv,
        match="holds last.pth of an earlier run: continue it with --resume, "
        "or start a new run elsewhere with --output-dir DIR",
    )
    assert tiny_run.read_bytes() == before


def test_not_a_checkpoint_and_a_malicious_pickle_are_refused(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_text("not a checkpoint")
    argv = ["--data-path", tiny, "--output-dir", out, "--resume"]
    refused("lenet", *argv, match="not a checkpoint")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"family": "lenet", "model": Exploit()}, out / "last.pth")
    refused("lenet", *argv, match="not a checkpoint")
    assert not marker.exists()


# --- transfer learning -----------------------------------------------------------------------


def test_imagenet_weights_from_torch_hubs_cache_and_freeze_backbone_train_only_the_new_head(
    tiny, tmp_path, monkeypatch
):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[1])  # as if downloaded once
    out = tmp_path / "run"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    argv = ["--data-path", tiny, "--arch", "resnet18", "--image-size", "64", "--epochs", "1"]
    train_py = load_script("resnet", "train")  # in this process: one interpreter fewer
    argv += ["--weights", "imagenet", "--freeze-backbone", "--output-dir", out, "--workers", "0"]
    train_py.main(train_py.get_args_parser().parse_args(list(map(str, argv))))
    trained = weights_of(out / "last.pth")
    assert trained["fc.weight"].shape == (3, 512)
    for name, tensor in reference.state_dict().items():
        if name.startswith("fc."):
            continue  # batch norm's running statistics included: a frozen layer keeps them
        assert torch.equal(trained[name], tensor), f"{name} moved though it is frozen"


def test_imagenet_weights_offline_name_the_file_and_where_it_goes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # a closed local port: no network
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    argv = [
        "--data-path",
        tiny,
        "--arch",
        "vgg11",
        "--weights",
        "imagenet",
        "--output-dir",
        tmp_path / "o",
    ]
    message = refused("vgg", *argv, match="cannot download .*vgg11-")
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message


def test_freeze_backbone_without_weights_is_refused(tiny, tmp_path):
    argv = [
        "--data-path",
        tiny,
        "--freeze-backbone",
        "--output-dir",
        tmp_path / "o",
        "--arch",
        "vgg11",
    ]
    refused("vgg", *argv, match="--freeze-backbone needs --weights")


def test_lenet_tutorial_dataset_offline_is_one_line(tmp_path):
    # The download must fail here: a proxy on a closed local port stands in for "no network".
    env = {
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    copy = tmp_path / "repo"
    for name in ("lenet/train.py", "lenet/model.py", "lenet/utils.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text((REPO / name).read_text())
    result = run_script(
        copy / "lenet" / "train.py", "--dataset", "cifar10", "--output-dir", tmp_path / "o", env=env
    )
    assert_one_line_error(result, "cannot get cifar10", "--dataset flowers")
