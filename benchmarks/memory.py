"""The memory one training step of each folder's recipe needs, at its default batch size.

    $ python benchmarks/memory.py                       # the CPU estimate, every network below
    $ python benchmarks/memory.py --models vgg16 resnet50 --batch 64
    $ python benchmarks/memory.py --device cuda         # measured under a 6 GiB cap, on a GPU

On any machine, real training steps of train.py's recipe (its model, AdamW, bf16 autocast as
on a GPU from Ampere on, channels_last) are taken apart: the fp32 weights, their gradients,
AdamW's state, the bf16 copies of the weights that autocast makes, and every other tensor the
step saves for backward (counted once per storage, through autograd's saved-tensor hooks;
measured at batches of 1 and 2, and extended linearly to the batch asked for).
Their sum is what the step holds at its peak, before the allocator's rounding, cuDNN's
workspaces and the CUDA context (some hundreds of MiB), which only a GPU can show.

With --device cuda, the whole process is also held to --cap GiB, as a card of that size would
hold it. For each network, one unmeasured step at the default batch loads its kernels and lets
cuDNN try its algorithms; what the GPU then holds beyond the allocator's reserve and beyond
what it held before this process's first CUDA call (NVML's count, where pynvml is installed:
other processes, and a pytest that started this script, are not counted) is the part outside
PyTorch's allocator: the CUDA context, the kernels loaded, the cuBLAS and cuDNN handles. The
allocator is capped to the rest (torch.cuda.set_per_process_memory_fraction). At each batch,
one unmeasured step (cuDNN's trials at the new shape), then a few measured ones give the peak
(torch.cuda.max_memory_reserved() plus the outside part), and the largest batch that still
fits is searched (doubling up to 4096, then bisection; "at least 4096" where every batch fit).
The precision is what train.py's --amp auto picks on this GPU (bf16 from compute capability
8.0, fp16 below).
Writes benchmarks/memory.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from throughput import load_train_py
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
CEILING = 4096  # the largest batch the search tries
# network -> (folder, --arch or None, default batch of that folder's train.py, image size)
NETWORKS = {
    "lenet": ("lenet", None, 64, 32),
    "alexnet": ("alexnet", None, 64, 224),
    "vgg16": ("vgg", "vgg16", 32, 224),
    "vgg16_bn": ("vgg", "vgg16_bn", 32, 224),
    "vgg19_bn": ("vgg", "vgg19_bn", 32, 224),
    "googlenet": ("googlenet", None, 32, 224),
    "resnet34": ("resnet", "resnet34", 32, 224),
    "resnet50": ("resnet", "resnet50", 32, 224),
    "resnet101": ("resnet", "resnet101", 32, 224),
    "resnext50_32x4d": ("resnet", "resnext50_32x4d", 32, 224),
}


def storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class RecordWeightCasts(TorchDispatchMode):
    """Notes the storage of every copy autocast makes of a weight (aten._to_copy of one)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = {storage_key(p) for p in params}
        self.casts: set[tuple] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(source):
            if storage_key(source) in self.weights:
                self.casts.add(storage_key(out))
        return out


def step_memory(model, step, params: list[torch.Tensor], amp_dtype) -> dict:
    """Bytes of what one training step holds, by kind; step() runs forward and backward.

    Saved tensors are recorded as autograd packs them: a storage counts once however many
    ops save it; the weights themselves are counted as weights, and the copies autocast makes
    of them apart from the other activations.
    """
    weight_storages = {storage_key(p) for p in params}
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in weight_storages:
            saved[key] = nbytes(t)
        return t

    with RecordWeightCasts(params) as casts, saved_tensors_hooks(pack, lambda t: t):
        step()
    return {
        "autocast_copies": sum(n for key, n in saved.items() if key in casts.casts),
        "saved_activations": sum(n for key, n in saved.items() if key not in casts.casts),
    }


def build(name: str, device: torch.device, amp_dtype):
    """train.py's model, optimizer and one step for network name, on device."""
    folder, arch, batch, size = NETWORKS[name]
    train_py = load_train_py(folder)
    argv = ["--image-size", str(size)] + (["--arch", arch] if arch else [])
    args = train_py.get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    model = train_py.build_model(args, 5).to(device, memory_format=torch.channels_last).train()
    optimizer = train_py.make_optimizer(model, args)
    criterion = torch.nn.CrossEntropyLoss()

    def step(batch_size: int) -> None:
        images = torch.randn(batch_size, 3, size, size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(0, 5, (batch_size,), device=device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = train_py.compute_loss(model(images), targets, criterion)
        loss.backward()

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step, update


def estimate(name: str, batch: int, amp_dtype) -> dict:
    """The CPU estimate of one step of network name at batch.

    The step runs for real at batches of 1 and 2: what it saves grows linearly with the batch
    (per image), so those two give it at any batch without the compute of a large one.
    """
    device = torch.device("cpu")
    model, optimizer, step, update = build(name, device, amp_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    one, two = (step_memory(model, lambda n=n: step(n), params, amp_dtype) for n in (1, 2))
    saved = {k: one[k] + (two[k] - one[k]) * (batch - 1) for k in one}
    update()  # AdamW's state exists from its first step on
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    parts = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.numel() * p.element_size() for p in params),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
        **saved,
    }
    return {**parts, "total": sum(parts.values())}


def used_before_cuda(index: int) -> int:
    """Bytes in use on GPU index before this process's first CUDA call, as NVML counts them
    (the memory of other processes); 0, with a note, where pynvml is not installed."""
    try:
        return torch.cuda.device_memory_used(index)  # NVML only: no CUDA context made here
    except Exception as e:  # no pynvml, no NVML: a missing module or one of NVML's errors
        print(f"note: NVML not readable ({e}); counting every process on the GPU as this one")
        return 0


def measure_cuda(name: str, batch: int, amp_dtype, cap_gib: float, baseline: int) -> dict:
    """Peak memory of a few real steps on the GPU, the whole process held to cap_gib, and the
    largest batch that fits."""
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0, device)  # the last network's cap off
    torch.cuda.empty_cache()  # and its blocks returned
    model, optimizer, step, update = build(name, device, amp_dtype)
    torch.backends.cudnn.benchmark = True

    def run(batch_size: int, steps: int) -> None:
        for _ in range(steps):
            step(batch_size)
            update()
        torch.cuda.synchronize(device)

    run(batch, 1)  # this network's kernels loaded, cuDNN's handles made
    free, _ = torch.cuda.mem_get_info(device)
    outside = total - free - baseline - torch.cuda.memory_reserved(device)
    fraction = (cap_gib * GIB - outside) / total  # what the card leaves the allocator
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, fraction)), device)

    def peak(batch_size: int) -> float | None:
        try:
            run(batch_size, 1)  # cuDNN tries its algorithms at a new shape: not measured
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            run(batch_size, 2)
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return None
        return (torch.cuda.max_memory_reserved(device) + outside) / GIB

    measured = peak(batch)
    low, high = (batch, None) if measured is not None else (0, batch)
    while high is None and low < CEILING:  # double until a batch no longer fits
        if peak(2 * low) is None:
            high = 2 * low
        else:
            low *= 2
    while high is not None and high - low > 1:  # then bisect between the last fit and misfit
        middle = (low + high) // 2
        if peak(middle) is None:
            high = middle
        else:
            low = middle
    largest = f"at least {low}" if high is None else str(low)  # the search stopped at CEILING
    return {
        "peak_gib": measured,
        "largest_batch_under_cap": largest,
        "cap_gib": cap_gib,
        "outside_allocator_gib": outside / GIB,
    }


def markdown(rows: list[dict], cuda: bool) -> str:
    head = [
        "model",
        "batch",
        "weights",
        "gradients",
        "AdamW state",
        "autocast copies",
        "saved activations",
        "estimate, GiB",
    ]
    if cuda:
        head += ["measured peak, GiB", "largest batch under cap"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        mib = [
            f"{r[k] / 2**20:.0f} MiB"
            for k in ("weights", "gradients", "optimizer", "autocast_copies", "saved_activations")
        ]
        cells = [r["model"], str(r["batch"]), *mib, f"{r['total'] / GIB:.2f}"]
        if cuda:
            peak = r.get("peak_gib")
            cells += [
                "does not fit" if peak is None else f"{peak:.2f}",
                str(r.get("largest_batch_under_cap")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(NETWORKS),
        choices=list(NETWORKS),
        help="networks to measure (default: all)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size for every network (default: each folder's default)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: the estimate only; cuda: also measure (default: cpu)",
    )
    parser.add_argument(
        "--cap",
        type=float,
        default=6.0,
        help="GiB the process may use on the GPU (default: 6, a 6 GB card)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "memory.json",
        help="where to write the results (default: benchmarks/memory.json)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/memory.py: error: --device cuda, but CUDA is not available here")
    amp_dtype = torch.bfloat16  # the estimate: as on GPUs from Ampere on (fp16: the same size)
    rows = []
    if args.device == "cuda":
        baseline = used_before_cuda(0)  # before the first CUDA call: device 0 is the current one
        device = torch.device("cuda", torch.cuda.current_device())
        amp_dtype, why = load_train_py("resnet").utils.pick_amp("auto", device)
        print(f"{torch.cuda.get_device_name(device)}, amp {why}")
    for name in args.models:
        batch = args.batch or NETWORKS[name][2]
        started = time.perf_counter()
        row = {"model": name, "batch": batch, **estimate(name, batch, amp_dtype)}
        if args.device == "cuda":
            row.update(measure_cuda(name, batch, amp_dtype, args.cap, baseline))
        rows.append(row)
        print(
            f"{name}: {row['total'] / GIB:.2f} GiB estimated "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": gpu,
        "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
    }
    table = markdown(rows, cuda=args.device == "cuda")
    print(table)
    args.json.write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
