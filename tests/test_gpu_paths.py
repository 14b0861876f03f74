"""Gradient accumulation, and the GPU paths of train.py, predict.py and memory.py, reached
under a fake GPU that checks every CUDA call as torch does (conftest.fake_gpu)."""

import argparse
import re
import runpy
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    FAMILIES,
    REPO,
    SMALL,
    ReachedGPU,
    answer,
    load_module,
    load_script,
    run_script,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CPU_FP32 = ["--device", "cpu", "--amp", "off", "--workers", "0", "--image-size", "32"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --- gradient accumulation -------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["on", "off"])
def test_accumulating_two_batches_of_8_equals_one_batch_of_16(
    flowers, tmp_path, monkeypatch, cache
):
    """Every optimizer step sees the same gradient, on real photos, with the cache on and off.

    The weights themselves are not compared: AdamW divides each gradient by its own size, so
    float rounding in a near-zero gradient (the sums run in another order) can move a weight
    by up to the learning rate. A tiny --lr keeps the weights of the runs together, so that
    each step's gradient can be compared.
    """
    train_py = load_script("lenet", "train")
    make_optimizer, gradients = train_py.make_optimizer, []

    def recording(model, args):
        optimizer = make_optimizer(model, args)
        optimizer.register_step_pre_hook(
            lambda *_: gradients[-1].append([p.grad.clone() for p in model.parameters()])
        )
        return optimizer

    monkeypatch.setattr(train_py, "make_optimizer", recording)
    runs = {"big": ["-b", "16"], "accumulated": ["-b", "8", "--accum-steps", "2"]}
    runs["single"] = ["-b", "8"]
    for name, flags in runs.items():
        gradients.append([])
        argv = ["--data-path", str(flowers), "--epochs", "1", "--lr", "1e-9", "--cache", cache]
        argv += [*CPU_FP32, "--output-dir", str(tmp_path / name), *flags]
        train_py.main(train_py.get_args_parser().parse_args(argv))
    big, accumulated, single = gradients
    assert len(big) == len(accumulated) == 9  # 135 photos: 8 steps of 16 and one of 7
    for step_big, step_accumulated in zip(big, accumulated, strict=True):
        for g_big, g_accumulated in zip(step_big, step_accumulated, strict=True):
            torch.testing.assert_close(g_accumulated, g_big, rtol=1e-4, atol=1e-6)
    # And the comparison can fail: a step of 8 photos has another gradient.
    assert not torch.allclose(single[0][-2], big[0][-2], atol=1e-6)


def test_too_many_accumulation_steps_for_the_data_is_one_line(tiny, tmp_path):
    out = ["--output-dir", tmp_path / "o"]
    result = run_script(
        REPO / "lenet" / "train.py",
        "--data-path",
        tiny,
        *out,
        *CPU_FP32,
        "-b",
        "8",
        "--accum-steps",
        "5",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--accum-steps 5" in result.stderr.strip().splitlines()[-1]


# --- mixed precision and devices on GPUs that are not here -----------------------------------


def test_auto_amp_follows_the_compute_capability(fake_gpu):
    utils = load_script("resnet", "utils")
    cuda = torch.device("cuda", 0)
    expected = {(6, 1): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16}
    expected |= {(8, 6): torch.bfloat16, (9, 0): torch.bfloat16}
    for capability, dtype in expected.items():
        fake_gpu.capability = capability
        chosen, why = utils.pick_amp("auto", cuda)
        assert chosen == dtype, capability
        assert f"{capability[0]}.{capability[1]}" in why
    fake_gpu.capability = (7, 5)
    assert "grad scaler" in utils.pick_amp("auto", cuda)[1]
    assert utils.pick_amp("off", cuda)[0] is None


def test_a_gpu_without_kernels_in_this_build_is_named(fake_gpu, capsys):
    utils = load_script("resnet", "utils")
    for capability in ((7, 5), (8, 9), (12, 0)):  # listed; a later minor; PTX of 9.0 runs on
        fake_gpu.capability = capability
        assert utils.cuda_problem(0) is None, capability
    fake_gpu.capability = (6, 1)  # a GTX 1060
    assert "sm_61" in utils.cuda_problem(0)
    assert utils.pick_device("auto") == torch.device("cpu")
    assert "running on the CPU" in capsys.readouterr().err
    with pytest.raises(utils.UserError, match="--device cuda: Fake GPU .* sm_61"):
        utils.pick_device("cuda")
    with pytest.raises(utils.UserError, match="--device cuda:0: Fake GPU .* sm_61"):
        utils.pick_device("cuda:0")


def test_out_of_memory_in_the_size_check_is_not_blamed_on_the_image_size():
    utils = load_script("lenet", "utils")

    class Hungry(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        utils.check_image_size(Hungry(), 32, "lenet", torch.device("cpu"))


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_out_of_memory_says_how_to_keep_the_recipe(tiny, tmp_path, monkeypatch, amp):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    script = REPO / "resnet" / "train.py"
    argv = [str(script), "--data-path", str(tiny), "--output-dir", str(tmp_path / "o")]
    argv += ["--arch", "resnet18", "-b", "32", "--amp", amp, "--workers", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    for name in ("model", "utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    monkeypatch.setattr(torch.nn.Module, "to", no_memory)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    message = str(exit_info.value.code)
    assert message.startswith("resnet/train.py: error: CUDA ran out of memory at --batch-size 32")
    assert "do not shrink with it" in message and "about half the memory" not in message
    command = message.split("with half the activations: ", 1)[1].split("; --amp")[0]
    assert command.endswith("--batch-size 16 --accum-steps 2")
    assert ("--amp bf16 or fp16" in message) == (amp == "off")


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_out_of_memory_at_a_tiny_batch_advises_no_smaller_one(tmp_path, batch):
    train_py = load_script("resnet", "train")
    argv = ["--batch-size", str(batch), "--output-dir", str(tmp_path), "--amp", "off"]
    message = train_py.out_of_memory_message(train_py.get_args_parser().parse_args(argv))
    assert message.startswith(f"CUDA ran out of memory at --batch-size {batch}; try a smaller")
    assert "--batch-size 1 " not in message + " " and "--amp bf16 or fp16" in message


def test_amp_off_on_a_gpu_multiplies_in_tf32_where_it_has_it(fake_gpu, monkeypatch):
    utils = load_script("resnet", "utils")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.backends.cuda.matmul.allow_tf32  # a flag of torch's C++ side
    try:
        for capability, tf32 in (((8, 6), True), ((7, 5), False)):
            fake_gpu.capability = capability
            run = utils.start_run("cuda", "off")
            assert run.amp is None and torch.backends.cuda.matmul.allow_tf32 is tf32
            assert ("TF32" in run.amp_reason) is tf32, run.amp_reason
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --- resuming with another precision ---------------------------------------------------------


def test_resume_in_fp16_from_a_fp32_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data-path", tiny, "--epochs", "1", "--output-dir", out, *CPU_FP32]
    first = run_script(REPO / "lenet" / "train.py", *argv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert torch.load(out / "last.pth", weights_only=True)["scaler"] == {}  # a disabled scaler

    train_py = load_script("lenet", "train")
    # fp16 with an enabled grad scaler, as on a GPU (the CPU runs fp16 autocast too).
    fp16 = lambda name, device: (torch.float16, "fp16 (test)")  # noqa: E731
    monkeypatch.setattr(train_py.utils, "pick_amp", fp16)
    argv = ["--data-path", str(tiny), "--epochs", "2", "--output-dir", str(out), "--resume"]
    train_py.main(train_py.get_args_parser().parse_args([*argv, *CPU_FP32]))
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] > 0


# --- --cache auto ----------------------------------------------------------------------------


@pytest.mark.parametrize("ram_mib, cached", [(10_000, True), (1, False)])
def test_cache_auto_caches_what_fits_comfortably_in_memory(
    tiny, monkeypatch, capsys, ram_mib, cached
):
    train_py = load_script("lenet", "train")
    page, pages = 4096, ram_mib * 2**20 // 4096
    monkeypatch.setattr(
        train_py.utils.os, "sysconf", {"SC_PAGE_SIZE": page, "SC_PHYS_PAGES": pages}.get
    )
    args = train_py.get_args_parser().parse_args(["--data-path", str(tiny), "--workers", "0"])
    assert args.cache == "auto"
    run = train_py.utils.Run(torch.device("cpu"), None, "off")
    train_set, val_set, _ = train_py.load_datasets(args, run, 0)
    assert isinstance(train_set, train_py.utils.CachedImages) == cached
    assert isinstance(val_set, train_py.utils.CachedImages) == cached
    line = capsys.readouterr().out.splitlines()[0]
    if cached:
        assert re.fullmatch(
            r"decoded photos cached in RAM: \d+ MiB \(--cache auto: under an eighth "
            r"of the 10000 MiB this process may use\)",
            line,
        ), line
    else:
        assert (
            line == "photos decoded anew each epoch: cached, they would take over an eighth "
            "of the 1 MiB this process may use"
        )


def test_the_cache_estimate_bounds_what_caching_holds(tiny, monkeypatch, capsys):
    """The estimate (4:3 photos at twice the crop size) is at least what the cache takes."""
    train_py = load_script("lenet", "train")
    argv = ["--data-path", str(tiny), "--workers", "0", "--image-size", "32"]
    args = train_py.get_args_parser().parse_args(argv)
    run = train_py.utils.Run(torch.device("cpu"), None, "off")
    train_set, val_set, _ = train_py.load_datasets(args, run, 0)
    estimate = (len(train_set) + len(val_set)) * 4 * (2 * 32) ** 2  # as cache() reckons it
    assert train_set.nbytes + val_set.nbytes <= estimate


# --- start-up under the fake GPU: every script, up to its first CUDA work --------------------


def train_args(train_py, data, out, *flags):
    argv = ["--data-path", str(data), "--output-dir", str(out), "--workers", "0", *flags]
    return train_py.get_args_parser().parse_args(argv)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_train_py_starts_up_on_a_gpu(fake_gpu, tiny, tmp_path, family, device):
    train_py = load_script(family, "train")
    args = train_args(train_py, tiny, tmp_path / "o", "--device", device, *SMALL[family])
    with pytest.raises(ReachedGPU):  # torch refused nothing before the model went to the GPU
        train_py.main(args)
    assert ("set_device", 0) in fake_gpu.calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank", [0, 1])
def test_train_py_starts_up_as_either_of_two_torchrun_processes(
    fake_gpu, tiny, tmp_path, monkeypatch, family, rank
):
    fake_gpu.count = 2
    for name, value in {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": 2,
        "LOCAL_WORLD_SIZE": 2,
    }.items():
        monkeypatch.setenv(name, str(value))
    train_py = load_script(family, "train")
    args = train_args(train_py, tiny, tmp_path / "o", *SMALL[family])
    with pytest.raises(ReachedGPU):
        train_py.main(args)
    # --device auto checked the process's own GPU, made it current, then NCCL started on it.
    assert ("get_device_capability", rank) in fake_gpu.calls
    assert ("get_device_capability", 1 - rank) not in fake_gpu.calls
    assert fake_gpu.current == rank and ("init_process_group", "nccl") in fake_gpu.calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_predict_py_starts_up_on_a_gpu(fake_gpu, tiny, tmp_path, monkeypatch, family, device):
    train_py = load_script(family, "train")
    args = train_args(train_py, tiny, tmp_path / "o", *SMALL[family])
    model = train_py.build_model(args, 3)
    checkpoint = {"family": family, "arch": args.arch, "model": model.state_dict(), "epoch": 1}
    checkpoint |= {"classes": ["a", "b", "c"], "image_size": args.image_size}
    checkpoint |= {"mean": train_py.MEAN, "std": train_py.STD}
    (tmp_path / "best.pth").touch()  # read below without saving VGG's 0.5 GB
    predict_py = load_script(family, "predict")
    monkeypatch.setattr(predict_py.utils, "load_checkpoint", lambda path, family: checkpoint)
    photo = next((tiny / "val" / "a").iterdir())
    argv = [str(photo), "--device", device, "--weights", str(tmp_path / "best.pth")]
    with pytest.raises(ReachedGPU):
        predict_py.main(predict_py.get_args_parser().parse_args(argv))
    assert ("get_device_capability", 0) in fake_gpu.calls


def load_memory_py():
    sys.path.insert(0, str(REPO / "benchmarks"))  # memory.py imports throughput.py beside it
    try:
        return load_module(REPO / "benchmarks" / "memory.py", "benchmarks_memory")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_memory_py_starts_up_on_a_gpu_in_the_precision_train_py_picks(fake_gpu, monkeypatch):
    memory, picked = load_memory_py(), []
    monkeypatch.setattr(memory, "estimate", lambda name, batch, amp: picked.append(amp) or {})
    argv = ["--models", "lenet", "--device", "cuda"]
    for capability, amp in (((8, 6), torch.bfloat16), ((7, 5), torch.float16)):
        fake_gpu.capability = capability
        with pytest.raises(ReachedGPU):  # the network placed on the GPU
            memory.main(memory.get_args_parser().parse_args(argv))
        assert picked.pop() == amp, capability
    assert ("get_device_capability", 0) in fake_gpu.calls


def test_memory_py_measures_outside_the_allocator_after_the_networks_first_step(
    fake_gpu, monkeypatch
):
    """The GPU holds 1 GiB of other processes' (the baseline, before the first CUDA call), and
    this network's first step loads kernels worth 3 GiB more: 3 GiB are outside the allocator,
    and a 6 GiB card leaves the allocator 3 of the fake's 8 GiB. Each batch's peak is measured
    after one unmeasured step at that batch (cuDNN's trials), the peak counter reset between."""
    memory, events, fractions = load_memory_py(), [], []
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))])
    used = lambda: 4 * 2**30 if any(e[0] == "step" for e in events) else 2**30  # noqa: E731
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30 - used(), 8 * 2**30)
    )
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d=None: events.append(("reset",))
    )
    fake_set = torch.cuda.set_per_process_memory_fraction

    def recording(fraction, device=None):
        fake_set(fraction, device)  # torch's checks: a float in [0, 1], a device with an index
        fractions.append(fraction)

    def step(batch_size):
        if batch_size > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        events.append(("step", batch_size))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", recording)
    monkeypatch.setattr(memory, "build", lambda *a: (None, optimizer, step, lambda: None))
    result = memory.measure_cuda("lenet", 64, torch.bfloat16, 6.0, baseline=2**30)
    assert result["outside_allocator_gib"] == pytest.approx(3.0)
    assert fractions == [1.0, pytest.approx(3 / 8)]
    assert result["peak_gib"] == pytest.approx(3.0)  # the fake's allocator reserves nothing
    resets = [i for i, event in enumerate(events) if event == ("reset",)]
    assert len(resets) >= 3  # 64, 128 (too many), then the bisection
    for i in resets:  # each reset follows a step at the batch it measures
        assert events[i - 1][0] == "step" and events[i + 1] == events[i - 1]


@pytest.mark.parametrize("fits_up_to, largest", [(100, "100"), (None, "at least 4096")])
def test_memory_py_says_at_least_where_the_search_hit_its_ceiling(
    fake_gpu, monkeypatch, fits_up_to, largest
):
    memory = load_memory_py()
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))])

    def step(batch_size):
        if fits_up_to is not None and batch_size > fits_up_to:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(memory, "build", lambda *a: (None, optimizer, step, lambda: None))
    result = memory.measure_cuda("lenet", 64, torch.bfloat16, 6.0, baseline=0)
    assert result["largest_batch_under_cap"] == largest


# --- the GPU-path defects, each where a fake reaches it ---------------------------------------


def test_a_gpu_index_that_is_not_there_is_one_line(fake_gpu, tmp_path, monkeypatch):
    utils = load_script("lenet", "utils")
    with pytest.raises(utils.UserError, match="this machine has 1 CUDA device"):
        utils.pick_device("cuda:1")
    # torchrun with more processes than GPUs: both numbers, and what to pass.
    fake_gpu.count = 2
    for name, value in {"RANK": 2, "LOCAL_RANK": 2, "WORLD_SIZE": 3, "LOCAL_WORLD_SIZE": 3}.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(utils.UserError, match=r"torchrun started 3 processes .* 2 CUDA device"):
        utils.start_run("auto", "auto")
    with pytest.raises(utils.UserError, match=r"device\(s\): pass --nproc_per_node=2"):
        utils.start_run("cuda", "auto")


def test_torchrun_on_mps_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", answer(True))
    for name, value in {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 2}.items():
        monkeypatch.setenv(name, str(value))
    utils = load_script("lenet", "utils")
    started = []
    monkeypatch.setattr(utils.dist, "init_process_group", lambda *a, **k: started.append(a))
    with pytest.raises(utils.UserError, match="torchrun on MPS: .* --device cpu"):
        utils.start_run("auto", "auto")
    assert not started


@pytest.mark.parametrize(
    "capability, archs, runs",
    [
        ((8, 7), ["sm_80", "sm_86"], False),  # Jetson Orin: torch's table excludes it
        ((10, 1), ["sm_100", "sm_120"], False),  # Thor under CUDA 13.0
        ((8, 9), ["sm_86"], True),
        ((12, 0), ["sm_90", "compute_90"], True),
        ((9, 0), ["sm_90a"], True),
        ((6, 1), ["sm_75", "compute_75"], False),
    ],
)
def test_which_gpus_this_build_runs_on_is_torchs_rule(fake_gpu, capability, archs, runs):
    fake_gpu.capability, fake_gpu.archs = capability, archs
    problem = load_script("resnet", "utils").cuda_problem(0)
    assert (problem is None) == runs, problem


def tiny_training(train_py, distributed: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loader = DataLoader(
        TensorDataset(torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))), batch_size=4
    )
    args = argparse.Namespace(accum_steps=1, dry_run=False, batch_size=4, epochs=1, lr=1e-3)
    run = train_py.utils.Run(torch.device("cpu"), None, "off", 0, 2 if distributed else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, nn.CrossEntropyLoss(), optimizer, scheduler, scaler, loader, 1, args, run


@pytest.mark.parametrize("diverged", ["here", "elsewhere"])
def test_a_diverged_loss_is_judged_on_every_processs_totals(monkeypatch, diverged):
    train_py = load_script("lenet", "train")
    reduced = []

    def all_reduce(sums):  # another process's totals join this one's
        reduced.append(True)
        if diverged == "elsewhere":
            sums[1] += float("inf")

    monkeypatch.setattr(train_py.dist, "all_reduce", all_reduce)
    inputs = tiny_training(train_py, distributed=True)
    if diverged == "here":
        nn.init.constant_(inputs[0][1].weight, float("nan"))
    # Every process reaches the all-reduce, and each stops on the same totals: none is left
    # waiting in a collective for one that has already exited.
    with pytest.raises(train_py.UserError, match="training diverged"):
        train_py.train_one_epoch(*inputs)
    assert reduced == [True]


def test_a_process_with_no_val_images_takes_part_in_the_evaluation(monkeypatch):
    train_py = load_script("lenet", "train")

    def all_reduce(sums):  # two processes: this one had no image, the other two (loss 3, 1 right)
        assert sums.tolist() == [0, 0, 0]
        sums += torch.tensor([2.0, 3.0, 1.0], dtype=sums.dtype)

    monkeypatch.setattr(train_py.dist, "all_reduce", all_reduce)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long)))
    args = argparse.Namespace(dry_run=False)
    run = train_py.utils.Run(torch.device("cpu"), None, "off", rank=1, world_size=2)
    result = train_py.evaluate(model, nn.CrossEntropyLoss(), empty, args, run)
    assert result["acc"] == 0.5 and result["loss"] == 1.5


def test_evaluation_reads_the_device_a_fixed_number_of_times(monkeypatch):
    """Each read (.item(), .cpu(), .tolist()) waits for the GPU: not one per batch."""
    train_py = load_script("lenet", "train")
    reads = []
    for name in ("item", "cpu", "tolist"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, m=method, **k: (reads.append(1), m(self, *a, **k))[1],
        )
    args, run = argparse.Namespace(dry_run=False), train_py.utils.Run(torch.device("cpu"), None, "")
    counts = []
    for batches in (1, 4):
        images, labels = torch.randn(4 * batches, 1, 2, 2), torch.zeros(4 * batches).long()
        loader = DataLoader(TensorDataset(images, labels), batch_size=4)
        reads.clear()
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        train_py.evaluate(model, nn.CrossEntropyLoss(), loader, args, run)
        counts.append(len(reads))
    assert counts[0] == counts[1]


def test_out_of_memory_advice_continues_a_saved_run_and_works(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data-path", tiny, "--epochs", "1", "--output-dir", out, *CPU_FP32, "-b", "8"]
    first = run_script(REPO / "lenet" / "train.py", *argv)
    assert first.returncode == 0, first.stderr[-2000:]

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    script = REPO / "lenet" / "train.py"
    argv = [str(script), "--data-path", str(tiny), "--epochs", "2", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--resume", *CPU_FP32, "-b", "8"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    for name in ("model", "utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    monkeypatch.setattr(torch.nn.Module, "to", no_memory)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    monkeypatch.undo()
    (out / ".lock").unlink()  # a run holds its folder until its process ends: this one is over
    message = str(exit_info.value.code)
    assert "continue with half the activations: python " in message
    command = shlex.split(message.split("activations: ", 1)[1].split("; --amp")[0])
    last = str(out / "last.pth")
    assert command[-6:] == ["--batch-size", "4", "--accum-steps", "2", "--resume", last]
    # The advice, run as given: it continues from epoch 1 with the same optimizer step.
    advised = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=600
    )
    assert advised.returncode == 0, advised.stderr[-2000:]
    assert "is ignored" not in advised.stdout
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2
    assert (resumed["args"]["batch_size"], resumed["args"]["accum_steps"]) == (4, 2)
