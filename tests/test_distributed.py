"""train.py under torchrun: DistributedDataParallel on the CPU with gloo, two processes."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL, jpeg_bytes, load_script, run_script, val_accuracy_of

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(
    family: str, *args, device="cpu", env=None, timeout=600
) -> subprocess.CompletedProcess:
    """train.py on two processes of device (gloo on the CPU, also where a GPU is present)."""
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*TORCHRUN, str(REPO / family / "train.py"), *map(str, args), "--device", device],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def weights_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


RESNET_TWO_EPOCHS = ["--epochs", "2", "--device", "cpu", *SMALL["resnet"]]


@pytest.fixture(scope="module")
def two_process_run(flowers, tmp_path_factory):
    """ResNet-18 trained two epochs by two processes on the sample; read, never written."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    return torchrun("resnet", "--data-path", flowers, *RESNET_TWO_EPOCHS, "--output-dir", out), out


def test_two_processes_write_one_set_of_outputs_and_report_the_true_accuracy(
    flowers, two_process_run
):
    result, out = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, result.stdout  # printed once, by rank 0
    assert "cpu x 2 processes" in result.stdout and "batch 32" in result.stdout
    # The default --workers is the machine's, shared by its two processes.
    assert f"{max(1, min(8, os.cpu_count() or 1) // 2)} workers," in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth",
        "curves.png",
        "last.pth",
        "metrics.csv",
    ]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]

    # The distributed validation counted every val image once: a single process agrees.
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    single = val_accuracy_of("resnet", out / "best.pth", flowers, *SMALL["resnet"])
    assert single == pytest.approx(last["history"][-1]["val_acc"], abs=1e-4)
    assert float(rows[-1]["val_acc"]) == pytest.approx(single, abs=1e-4)  # the last epoch


def test_one_step_on_two_processes_equals_one_step_on_one_with_twice_the_batch(flowers, tmp_path):
    # LeNet has neither batch norm nor dropout: the only difference is where the sum happens.
    common = [
        "--data-path",
        flowers,
        "--epochs",
        "1",
        "--dry-run",
        "--amp",
        "off",
        "--workers",
        "0",
        "--image-size",
        "32",
        "--cache",
        "off",
        "--device",
        "cpu",
    ]
    two = torchrun("lenet", *common, "-b", "8", "--output-dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_script(
        REPO / "lenet" / "train.py", *common, "-b", "16", "--output-dir", tmp_path / "one"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    one_ckpt = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    two_ckpt = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    for name, tensor in two_ckpt["model"].items():
        torch.testing.assert_close(tensor, one_ckpt["model"][name], rtol=1e-4, atol=1e-6)
    # The logged loss and accuracy are over all 16 images, not rank 0's 8.
    for key in ("train_loss", "train_acc"):
        assert two_ckpt["history"][0][key] == pytest.approx(one_ckpt["history"][0][key])


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="SyncBatchNorm runs on GPUs only in PyTorch: needs 2 CUDA devices",
)
def test_sync_bn_step_on_two_gpus_equals_one_gpu_with_twice_the_batch(flowers, tmp_path):
    """SyncBatchNorm normalises over both processes' images: the first step's loss and the
    running statistics are those of one batch twice as large. Not the weights after the step:
    AdamW's first step moves each weight by about lr times the sign of its gradient, which
    rounding flips for gradients near zero (TF32 off all the same: NVIDIA_TF32_OVERRIDE)."""
    common = ["--data-path", flowers, "--epochs", "1", "--dry-run", "--amp", "off", "--workers"]
    common += ["0", "--arch", "resnet18", "--image-size", "64", "--device", "cuda"]
    env, out = {"NVIDIA_TF32_OVERRIDE": "0"}, tmp_path / "two"
    two = torchrun(
        "resnet", *common, "--sync-bn", "-b", "8", "--output-dir", out, device="cuda", env=env
    )
    one = run_script(
        REPO / "resnet" / "train.py", *common, "-b", "16", "--output-dir", tmp_path / "one", env=env
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (
        torch.load(d / "last.pth", map_location="cpu", weights_only=True)
        for d in (out, tmp_path / "one")
    )
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-4)
    for name, tensor in a["model"].items():
        if "running_" in name:
            torch.testing.assert_close(tensor, b["model"][name], rtol=1e-3, atol=1e-5)


def test_sync_bn_on_cpu_is_refused_in_one_line():
    """Under torchrun on CPUs (two processes of gloo; tested in this process: the refusal comes
    before any collective call, and test_a_failure_in_one_process shows the line of a command)."""
    utils = load_script("resnet", "utils")
    run = utils.Run(torch.device("cpu"), None, "fp32", rank=0, world_size=2, local_world_size=2)
    with pytest.raises(utils.UserError, match="--sync-bn needs GPUs"):
        utils.distribute(torch.nn.BatchNorm2d(3), run, sync_bn=True, compile=False)


def test_interrupted_torchrun_resumes_to_the_same_weights(flowers, two_process_run, tmp_path):
    common = ["--data-path", flowers, *RESNET_TWO_EPOCHS]
    straight, straight_out = two_process_run  # the same flags, not interrupted
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "interrupted"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*TORCHRUN, str(REPO / "resnet" / "train.py"), *map(str, common), "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (out / "last.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    proc.communicate(timeout=300)

    resumed = torchrun("resnet", *common, "--output-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = weights_of(straight_out / "last.pth")
    b = weights_of(out / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failure_in_one_process_ends_the_job_with_a_clear_message(tmp_path):
    data = tmp_path / "data"
    for split, n in (("train", 12), ("val", 2)):
        for c, name in enumerate(("a", "b")):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                (data / split / name / f"{i}.jpg").write_bytes(
                    jpeg_bytes(c * 20 + i + 12 * (split == "val"))
                )
    good = jpeg_bytes(5, size=(200, 150))
    (data / "train" / "a" / "broken.jpg").write_bytes(good[: len(good) // 3])
    start = time.monotonic()
    result = torchrun(
        "lenet",
        "--data-path",
        data,
        "--epochs",
        "2",
        "--workers",
        "0",
        "-b",
        "4",
        "--output-dir",
        tmp_path / "o",
        timeout=300,
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 300
    assert re.search(
        r"\[rank \d\] lenet/train.py: error: cannot read image .*broken.jpg", result.stderr
    ), result.stderr[-3000:]
