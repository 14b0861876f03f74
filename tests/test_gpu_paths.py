"""Gradient accumulation, and the GPU paths of train.py reached with faked devices."""

import runpy
import sys

import pytest
import torch

from conftest import REPO, load_script, run_script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CPU_FP32 = ["--device", "cpu", "--amp", "off", "--workers", "0", "--image-size", "32"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --- gradient accumulation -------------------------------------------------------------------


def test_accumulating_two_batches_of_8_equals_one_batch_of_16(tiny, tmp_path):
    runs = {"big": ["-b", "16"], "accumulated": ["-b", "8", "--accum-steps", "2"]}
    for name, flags in runs.items():
        result = run_script(REPO / "lenet" / "train.py", "--data-path", tiny, "--epochs", "3",
                            "--output-dir", tmp_path / name, *CPU_FP32, *flags)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    big, accumulated = weights(tmp_path / "big" / "last.pth"), weights(tmp_path / "accumulated"
                                                                      / "last.pth")  # fmt: skip
    # 18 images: steps of 16 and 2 images per epoch in both runs; the accumulated last step
    # is the lone batch of 2, and counts as the big batch's last step does.
    for name in runs:
        state = torch.load(tmp_path / name / "last.pth", weights_only=True)
        assert state["scheduler"]["last_epoch"] == 3 * 2
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-4, atol=1e-5)
    # And the comparison can fail: without accumulation the weights differ.
    single = run_script(REPO / "lenet" / "train.py", "--data-path", tiny, "--epochs", "3",
                        "--output-dir", tmp_path / "single", *CPU_FP32, "-b", "8")  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    assert not torch.allclose(weights(tmp_path / "single" / "last.pth")["fc3.weight"],
                              big["fc3.weight"], atol=1e-5)  # fmt: skip


def test_too_many_accumulation_steps_for_the_data_is_one_line(tiny, tmp_path):
    result = run_script(REPO / "lenet" / "train.py", "--data-path", tiny, "--output-dir",
                        tmp_path / "o", *CPU_FP32, "-b", "8", "--accum-steps", "5")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--accum-steps 5" in result.stderr.strip().splitlines()[-1]


# --- mixed precision and devices on GPUs that are not here -----------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report one CUDA GPU of the capability the test sets, for a cu-style build."""
    state = {"capability": (8, 6), "archs": ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: state["archs"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    return state


def test_auto_amp_follows_the_compute_capability(fake_gpu):
    train_py = load_script("resnet", "train")
    cuda = torch.device("cuda")
    expected = {(6, 1): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16,
                (8, 6): torch.bfloat16, (9, 0): torch.bfloat16}  # fmt: skip
    for capability, dtype in expected.items():
        fake_gpu["capability"] = capability
        chosen, why = train_py.pick_amp("auto", cuda)
        assert chosen == dtype, capability
        assert f"{capability[0]}.{capability[1]}" in why
    fake_gpu["capability"] = (7, 5)
    assert "grad scaler" in train_py.pick_amp("auto", cuda)[1]
    assert train_py.pick_amp("off", cuda)[0] is None


def test_a_gpu_without_kernels_in_this_build_is_named(fake_gpu, capsys):
    train_py = load_script("resnet", "train")
    for capability in ((7, 5), (8, 9), (12, 0)):  # listed; a later minor; PTX of 9.0 runs on
        fake_gpu["capability"] = capability
        assert train_py.cuda_problem(0) is None, capability
    fake_gpu["capability"] = (6, 1)  # a GTX 1060
    assert "sm_61" in train_py.cuda_problem(0)
    assert train_py.pick_device("auto") == torch.device("cpu")
    assert "training on the CPU" in capsys.readouterr().err
    with pytest.raises(train_py.TrainingError, match="--device cuda: Fake GPU .* sm_61"):
        train_py.pick_device("cuda")
    predict_py = load_script("resnet", "predict")
    assert predict_py.pick_device("auto") == torch.device("cpu")
    with pytest.raises(predict_py.PredictError, match="sm_61"):
        predict_py.pick_device("cuda:0")


def test_out_of_memory_in_the_size_check_is_not_blamed_on_the_image_size():
    train_py = load_script("lenet", "train")

    class Hungry(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    args = train_py.get_args_parser().parse_args(["--image-size", "32"])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_py.check_image_size(Hungry(), args, torch.device("cpu"))


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_out_of_memory_says_how_to_keep_the_recipe(tiny, tmp_path, monkeypatch, amp):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    script = REPO / "resnet" / "train.py"
    argv = [str(script), "--data-path", str(tiny), "--output-dir", str(tmp_path / "o"),
            "--arch", "resnet18", "-b", "32", "--amp", amp, "--workers", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    monkeypatch.delitem(sys.modules, "model", raising=False)
    monkeypatch.setattr(torch.nn.Module, "to", no_memory)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    message = str(exit_info.value.code)
    assert message.startswith("resnet/train.py: error: CUDA ran out of memory at --batch-size 32")
    assert "--batch-size 16 --accum-steps 2" in message and "-b 32" not in message
    assert ("--amp bf16 or fp16" in message) == (amp == "off")


# --- resuming with another precision ---------------------------------------------------------


def test_resume_in_fp16_from_a_fp32_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = run_script(REPO / "lenet" / "train.py", "--data-path", tiny, "--epochs", "1",
                       "--output-dir", out, *CPU_FP32)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert torch.load(out / "last.pth", weights_only=True)["scaler"] == {}  # a disabled scaler

    train_py = load_script("lenet", "train")
    # fp16 with an enabled grad scaler, as on a GPU (the CPU runs fp16 autocast too).
    monkeypatch.setattr(train_py, "pick_amp", lambda name, device: (torch.float16, "fp16 (test)"))
    monkeypatch.setattr(train_py, "report_confusion", lambda *args: None)
    monkeypatch.setattr(train_py.signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    args = train_py.get_args_parser().parse_args(
        [
            "--data-path",
            str(tiny),
            "--epochs",
            "2",
            "--output-dir",
            str(out),
            "--resume",
            *CPU_FP32,
        ]  # fmt: skip
    )
    train_py.main(args)
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] > 0


# --- --cache auto ----------------------------------------------------------------------------


@pytest.mark.parametrize("free_mib, cached", [(10_000, True), (1, False), (None, False)])
def test_cache_auto_caches_what_fits_comfortably_in_free_memory(tiny, monkeypatch, capsys,
                                                                free_mib, cached):  # fmt: skip
    train_py = load_script("lenet", "train")
    free = None if free_mib is None else free_mib * 2**20
    monkeypatch.setattr(train_py, "available_memory", lambda: free)
    args = train_py.get_args_parser().parse_args(["--data-path", str(tiny), "--workers", "0"])
    vars(args).update(rank=0, world_size=1, distributed=False)
    assert args.cache == "auto"
    train_set, val_set, _ = train_py.load_datasets(args)
    assert isinstance(train_set, train_py.CachedImages) == cached
    assert isinstance(val_set, train_py.CachedImages) == cached
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"--cache auto: {'on' if cached else 'off'}, the decoded images")


def test_the_cache_estimate_counts_what_caching_holds(tiny):
    train_py = load_script("lenet", "train")
    argv = ["--data-path", str(tiny), "--cache", "on", "--workers", "0", "--image-size", "32"]
    args = train_py.get_args_parser().parse_args(argv)
    vars(args).update(rank=0, world_size=1, distributed=False)
    train_set, val_set, _ = train_py.load_datasets(args)
    estimate = train_py.decoded_bytes(*[train_py.ImageFolder(tiny / s) for s in ("train", "val")],
                                      32)  # fmt: skip
    assert estimate == train_set.nbytes + val_set.nbytes


def test_under_torchrun_each_process_caches_only_its_share_of_val(tiny):
    train_py = load_script("lenet", "train")
    folders = [train_py.ImageFolder(tiny / s) for s in ("train", "val")]
    argv = ["--data-path", str(tiny), "--cache", "on", "--workers", "0", "--image-size", "32"]
    caches = []
    for rank in (0, 1):  # 6 val images over 2 processes: 0, 2, 4 and 1, 3, 5
        args = train_py.get_args_parser().parse_args(argv)
        vars(args).update(rank=rank, world_size=2, distributed=True)
        train_set, val_set, _ = train_py.load_datasets(args)
        assert [i for i, image in enumerate(val_set.images) if image is not None] == [
            rank, rank + 2, rank + 4]  # fmt: skip
        assert train_set.decoded == 18  # training samples any image in any epoch
        caches.append(val_set)
        # What each process holds is what the estimate counts for one process.
        assert train_py.decoded_bytes(*folders, 32, 2) == train_set.nbytes + val_set.nbytes
    # The shares are the samples build_loaders gives each process, and read the same images.
    for rank, val_set in enumerate(caches):
        shard = train_py.Subset(val_set, range(rank, len(val_set), 2))
        assert [target for _, target in shard] == [val_set.targets[i] for i in shard.indices]
