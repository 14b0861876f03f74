"""On a real CUDA GPU: what the fake GPU of the other tests cannot show. Skipped without one.

    $ python -m pytest tests/test_on_gpu.py -v

Each folder's train.py with its defaults (one batch per epoch) and then its predict.py; the
resume of an fp16 run; torchrun over two GPUs where there are two; benchmarks/memory.py for
the five default networks, under a 6 GiB cap. Needs nothing beside the checkout: the photos
are the project's own (data/flower_sample).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, REPO, run_script

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_training_then_prediction(family, flowers, tmp_path):
    out = tmp_path / "run"
    trained = run_script(
        REPO / family / "train.py",
        "--data-path",
        flowers,
        "--epochs",
        "2",
        "--dry-run",
        "--output-dir",
        out,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert " on cuda:0, amp " in trained.stdout
    epoch_lines = [line for line in trained.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(" GiB" in line for line in epoch_lines)
    photo = next((flowers / "val" / "roses").iterdir())
    predicted = run_script(
        REPO / family / "predict.py",
        photo,
        "--weights",
        out / "best.pth",
        "--save",
        tmp_path / "p.png",
        "--json",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    top = json.loads(predicted.stdout)[0]["top"]
    assert top[0]["class"] in {"daisy", "dandelion", "roses", "sunflowers", "tulips"}


def test_an_fp16_run_resumes(flowers, tmp_path):
    common = ["--data-path", flowers, "--output-dir", tmp_path, "--amp", "fp16", "--dry-run"]
    first = run_script(REPO / "resnet" / "train.py", *common, "--epochs", "1", "--arch", "resnet18")
    assert first.returncode == 0, first.stderr[-3000:]
    last = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    assert last["scaler"]["scale"] > 0
    resumed = run_script(
        REPO / "resnet" / "train.py", *common, "--epochs", "2", "--resume", "--arch", "resnet18"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)["epoch"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_on_two_gpus(flowers, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "resnet" / "train.py"),
        "--data-path",
        str(flowers),
        "--epochs",
        "2",
        "--arch",
        "resnet18",
        "--image-size",
        "64",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda:0 x 2 processes, amp " in result.stdout and "batch 32:" in result.stdout
    assert torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)["epoch"] == 2


def test_memory_benchmark_of_the_five_default_networks(tmp_path):
    models = ["lenet", "alexnet", "vgg16", "googlenet", "resnet34"]
    result = run_script(
        REPO / "benchmarks" / "memory.py",
        "--device",
        "cuda",
        "--models",
        *models,
        "--json",
        tmp_path / "memory.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the table, for the README (pytest -s shows it)
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [row["model"] for row in rows] == models
    for row in rows:  # the default batch fits a 6 GiB card, the context included
        assert row["peak_gib"] is not None, row  # None: it ran out of memory under the cap
        assert int(row["largest_batch_under_cap"].split()[-1]) >= row["batch"], row
        # What the step keeps between steps (weights, gradients, AdamW's state) is in the peak,
        # and the CUDA context is this process's own: some hundreds of MiB, not a whole GPU.
        kept = row["weights"] + row["gradients"] + row["optimizer"]
        assert row["peak_gib"] * 2**30 >= kept, row
        assert 0.05 < row["outside_allocator_gib"] < 2.0, row
