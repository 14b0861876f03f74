"""Training and prediction speed of each family, side by side with the classic tutorial recipe.

    $ python benchmarks/throughput.py                        # the five default networks
    $ python benchmarks/throughput.py --models lenet resnet18 --repeats 5
    $ python benchmarks/throughput.py --data ~/flower_photos --json results.json

For each network, in one process of its own (so that its peak RAM is its own), two training
loops run on the same model.py, the same photos and the same batch size, interleaved:
  (a) classic: the recipe of the tutorials this project descends from: fp32, torchvision's
      ImageFolder with PIL decoding and RandomResizedCrop/flip/ToTensor/Normalize, Adam,
      contiguous NCHW, num_workers = min(CPUs, batch size, 8);
  (b) ours: the step of train.py, built from its own functions (its datasets and transforms,
      AdamW, autocast as `--amp auto` picks it, channels_last, its DataLoader settings), with
      and without `--cache`.
Images/s are counted over --steps batches after --warmup batches, median of --repeats (on a
GPU, between synchronisations). The compute limit is (b)'s step on one batch already in
memory, repeated: how close each loop comes to it shows what data loading costs.
Validation images/s compare the same two recipes in eval mode. Then each loop trains the
network for --accuracy-epochs on the split sample and both report val accuracy, so a speed-up
that costs accuracy shows. Last, predict.py's cold start (one image, wall time of the whole
command) and its images/s on a folder of 100 photos.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "flower_sample"
# network -> (folder, --arch or None, batch size, image size, timed steps, accuracy epochs).
# The timed steps outlast what the loader workers prefetch during warm-up (2 per worker), so
# that data loading counts; cheap networks get more of them, and more epochs to learn.
NETWORKS = {
    "lenet": ("lenet", None, 64, 32, 40, 15),
    "alexnet": ("alexnet", None, 32, 224, 8, 2),
    "googlenet": ("googlenet", None, 16, 224, 4, 2),
    "resnet34": ("resnet", "resnet34", 16, 224, 4, 2),
    "vgg16": ("vgg", "vgg16", 16, 224, 2, 1),
    "resnet18": ("resnet", "resnet18", 16, 224, 4, 2),
    "resnet50": ("resnet", "resnet50", 16, 224, 4, 2),
    "vgg11": ("vgg", "vgg11", 16, 224, 2, 1),
    "vgg16_bn": ("vgg", "vgg16_bn", 16, 224, 2, 1),
}
DEFAULT_MODELS = ["lenet", "alexnet", "vgg16", "googlenet", "resnet34"]


def load_train_py(folder: str):
    """Import a folder's train.py with that folder's model.py and utils.py."""
    sys.path.insert(0, str(ROOT / folder))
    for name in ("model", "utils"):  # another folder's, imported before this one
        sys.modules.pop(name, None)
    try:
        spec = importlib.util.spec_from_file_location(f"{folder}_train", ROOT / folder / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    train_py = load_train_py("lenet")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "bf16_cpu": train_py.utils.pick_amp("auto", torch.device("cpu"))[0] is not None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def timed_steps(loader, step, warmup: int, steps: int, sync=lambda: None) -> float:
    """Images/s of step over `steps` batches of loader after `warmup` batches.

    sync waits for the device (a GPU runs behind the Python that feeds it).
    """
    iterator = iter(loader)
    for _ in range(warmup):
        step(*next(iterator))
    sync()
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, targets = next(iterator)
        step(images, targets)
        seen += targets.size(0)
    sync()
    return seen / (time.perf_counter() - start)


def bench_one(name: str, args: argparse.Namespace, split: Path) -> dict:
    """Everything measured for one network; runs in a process of its own."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as classic_t

    folder, arch, batch, size, steps, epochs = NETWORKS[name]
    batch = args.batch_size or batch
    steps = args.steps or steps
    epochs = args.accuracy_epochs or epochs
    train_py = load_train_py(folder)
    device = train_py.utils.pick_device(args.device)
    amp_dtype, why = train_py.utils.pick_amp("auto", device)
    run = train_py.utils.Run(device, amp_dtype, why)  # one process
    workers = train_py.utils.loader_workers(None, run)
    cpus = os.cpu_count() or 1
    criterion = nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    # Enough photos for warm-up and timed steps, cycled if the folder is small.
    needed = (args.warmup + steps) * batch

    def cycle(dataset):
        repeats = -(-needed // len(dataset))
        return torch.utils.data.ConcatDataset([dataset] * repeats)

    def project_args(**overrides) -> argparse.Namespace:
        parser = train_py.get_args_parser()
        argv = ["--data-path", str(split), "--image-size", str(size), "-b", str(batch)]
        if arch:
            argv += ["--arch", arch]
        namespace = parser.parse_args(argv)
        vars(namespace).update(overrides)
        return namespace

    # (a) the classic recipe
    mean, std = train_py.MEAN, train_py.STD
    classic_train_tf = classic_t.Compose(
        [
            classic_t.RandomResizedCrop(size),
            classic_t.RandomHorizontalFlip(),
            classic_t.ToTensor(),
            classic_t.Normalize(mean, std),
        ]
    )
    classic_val_tf = classic_t.Compose(
        [
            classic_t.Resize(round(size / 0.875)),
            classic_t.CenterCrop(size),
            classic_t.ToTensor(),
            classic_t.Normalize(mean, std),
        ]
    )
    classic_workers = min(cpus, batch, 8)

    def classic_loaders(image_size_tf=(classic_train_tf, classic_val_tf), cycled=True):
        train_set = datasets.ImageFolder(split / "train", image_size_tf[0])
        val_set = datasets.ImageFolder(split / "val", image_size_tf[1])
        if cycled:
            train_set, val_set = cycle(train_set), cycle(val_set)
        return (
            DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=classic_workers),
            DataLoader(val_set, batch_size=batch, num_workers=classic_workers),
        )

    def classic_setup(num_classes: int):
        torch.manual_seed(0)
        model = train_py.build_model(project_args(), num_classes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=train_py.DEFAULTS["lr"])

        def step(images, targets):
            images, targets = images.to(device), targets.to(device)
            loss, _ = train_py.compute_loss(model(images), targets, criterion)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return model, step

    # (b) this project's train.py path
    def ours_loaders(cache: str):
        ours_args = project_args(cache=cache)
        train_set, val_set, _ = train_py.load_datasets(ours_args, run, workers)
        sampler, train_loader, val_loader = train_py.build_loaders(
            cycle(train_set), cycle(val_set), ours_args, run, workers
        )
        sampler.set_epoch(1)
        return train_loader, val_loader

    def ours_setup(num_classes: int):
        torch.manual_seed(0)
        ours_args = project_args()
        model = train_py.build_model(ours_args, num_classes)
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = train_py.make_optimizer(model, ours_args)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        def step(images, targets):  # the body of train.py's train_one_epoch
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = train_py.compute_loss(model(images), targets, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return model, step

    num_classes = len(datasets.ImageFolder(split / "train").classes)
    classic_train, classic_val = classic_loaders()
    ours_train, ours_val = ours_loaders(cache="off")
    cached_train, cached_val = ours_loaders(cache="on")
    classic_model, classic_step = classic_setup(num_classes)
    ours_model, ours_step = ours_setup(num_classes)
    runs = {"classic": [], "ours": [], "ours_cache": []}
    # The compute limit: the same step on one batch already in memory, again and again.
    in_memory = next(iter(cached_train))
    runs["limit"] = []
    # cuDNN's autotuning is a global switch: each loop runs with it as its script sets it.
    tuned = device.type == "cuda"  # train.py turns it on for GPUs; the classic scripts do not
    for _ in range(args.repeats):  # interleaved, so that drifts of the machine hit all alike
        classic_model.train()
        torch.backends.cudnn.benchmark = False
        runs["classic"].append(timed_steps(classic_train, classic_step, args.warmup, steps, sync))
        ours_model.train()
        torch.backends.cudnn.benchmark = tuned
        runs["ours"].append(timed_steps(ours_train, ours_step, args.warmup, steps, sync))
        runs["ours_cache"].append(timed_steps(cached_train, ours_step, args.warmup, steps, sync))
        runs["limit"].append(
            timed_steps([in_memory] * (args.warmup + steps), ours_step, args.warmup, steps, sync)
        )
    train_ips = {k: statistics.median(v) for k, v in runs.items()}

    def eval_rate(model, loader, prepare, dtype, benchmark: bool) -> float:
        model.eval()
        torch.backends.cudnn.benchmark = benchmark
        sync()
        start, seen = time.perf_counter(), 0
        with torch.no_grad():
            for images, targets in loader:
                images = prepare(images)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(images)
                seen += targets.size(0)
        sync()
        return seen / (time.perf_counter() - start)

    val_ips = {
        "classic": eval_rate(classic_model, classic_val, lambda x: x.to(device), None, False),
        "ours": eval_rate(
            ours_model,
            ours_val,
            lambda x: x.to(device, memory_format=torch.channels_last),
            amp_dtype,
            tuned,
        ),
    }
    del classic_model, ours_model, classic_train, ours_train, cached_train

    # Accuracy after the same short training: the classic loop here, train.py for real.
    acc_size = 32 if size == 32 else args.accuracy_image_size
    acc_tfs = (
        classic_t.Compose(
            [
                classic_t.RandomResizedCrop(acc_size),
                classic_t.RandomHorizontalFlip(),
                classic_t.ToTensor(),
                classic_t.Normalize(mean, std),
            ]
        ),
        classic_t.Compose(
            [
                classic_t.Resize(round(acc_size / 0.875)),
                classic_t.CenterCrop(acc_size),
                classic_t.ToTensor(),
                classic_t.Normalize(mean, std),
            ]
        ),
    )
    train_loader, val_loader = classic_loaders(acc_tfs, cycled=False)
    model, step = classic_setup(num_classes)
    for _ in range(epochs):
        model.train()
        for images, targets in train_loader:
            step(images, targets)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in val_loader:
            logits = model(images.to(device))
            correct += (logits.argmax(1).cpu() == targets).sum().item()
            total += targets.size(0)
    accuracy = {"classic": correct / total}
    for label, extra in (("ours", ["--cache", "off"]), ("ours_cache", ["--cache", "on"])):
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                str(ROOT / folder / "train.py"),
                "--data-path",
                str(split),
                "--epochs",
                str(epochs),
                "--image-size",
                str(acc_size),
                "-b",
                str(batch),
                "--output-dir",
                out,
                *extra,
            ]
            if arch:
                cmd += ["--arch", arch]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows = (Path(out) / "metrics.csv").read_text().splitlines()
            accuracy[label] = float(rows[-1].split(",")[4])

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "model": name,
        "batch": batch,
        "image_size": size,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "train_img_s": train_ips,
        "train_runs": runs,
        "val_img_s": val_ips,
        "speedup": train_ips["ours"] / train_ips["classic"],
        "speedup_cache": train_ips["ours_cache"] / train_ips["classic"],
        "of_limit": train_ips["ours"] / train_ips["limit"],
        "of_limit_cache": train_ips["ours_cache"] / train_ips["limit"],
        "steps": steps,
        "accuracy": accuracy,
        "accuracy_epochs": epochs,
        "accuracy_image_size": acc_size,
        "peak_ram_mib": peak,
    }


def bench_predict(name: str, split: Path, work: Path) -> dict:
    """predict.py's cold start on one photo and its rate on a folder of 100."""
    folder, arch, _, size, _, _ = NETWORKS[name]
    out = work / f"ckpt_{name}"
    cmd = [
        sys.executable,
        str(ROOT / folder / "train.py"),
        "--data-path",
        str(split),
        "--epochs",
        "1",
        "--dry-run",
        "--image-size",
        str(size),
        "--output-dir",
        str(out),
    ]
    if arch:
        cmd += ["--arch", arch]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    photos = sorted(split.glob("train/*/*"))
    hundred = work / "hundred"
    if not hundred.exists():
        hundred.mkdir()
        for i in range(100):
            shutil.copy(
                photos[i % len(photos)], hundred / f"{i:03d}{photos[i % len(photos)].suffix}"
            )
    predict = [
        sys.executable,
        str(ROOT / folder / "predict.py"),
        "--weights",
        str(out / "best.pth"),
        "--json",
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    subprocess.run([*predict, str(photos[0])], check=True, capture_output=True, env=env)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*predict, str(hundred)], check=True, capture_output=True, env=env)
    folder_s = time.perf_counter() - start
    return {"cold_start_s": cold, "folder_100_s": folder_s, "folder_img_s": 100 / folder_s}


def markdown(results: list[dict], info: dict, command: str) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"bf16 on CPU: {'yes' if info['bf16_cpu'] else 'no'}, GPU: {info['gpu'] or 'none'}; "
        f"{info['date']}; `{command}`",
        "",
        "| model | batch | amp | train img/s classic | ours | ours --cache | speed-up | "
        "speed-up --cache | compute limit img/s | of the limit: ours / --cache | "
        "val img/s classic / ours | val acc classic / ours / --cache | "
        "peak RAM MiB | predict: 1 photo, s | predict: 100 photos, s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for r in results:
        t, v, a, p = r["train_img_s"], r["val_img_s"], r["accuracy"], r["predict"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['amp']} | {t['classic']:.1f} | {t['ours']:.1f} "
            f"| {t['ours_cache']:.1f} | {r['speedup']:.2f}x | {r['speedup_cache']:.2f}x "
            f"| {t['limit']:.1f} | {r['of_limit']:.2f} / {r['of_limit_cache']:.2f} "
            f"| {v['classic']:.1f} / {v['ours']:.1f} "
            f"| {a['classic']:.2f} / {a['ours']:.2f} / {a['ours_cache']:.2f} "
            f"| {r['peak_ram_mib']:.0f} | {p['cold_start_s']:.1f} | {p['folder_100_s']:.1f} |"
        )
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
        default=DEFAULT_MODELS,
        choices=list(NETWORKS),
        help=f"networks to measure (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=SAMPLE,
        help="a folder of class sub-folders (default: data/flower_sample)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size of every loop (default: 64 for lenet, 32 for "
        "alexnet, 16 for the others, so that the run fits 2 CPU cores)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="batches before timing (default: 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed batches (default: per network, 4 to 40)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved repetitions; the median counts (default: 3)",
    )
    parser.add_argument(
        "--accuracy-epochs",
        type=int,
        default=3,
        help="epochs of the short training compared for accuracy (default: 3)",
    )
    parser.add_argument(
        "--accuracy-image-size",
        type=int,
        default=112,
        help="image size of that training, lenet aside (default: 112)",
    )
    parser.add_argument("--device", default="auto", help="as train.py's --device (default: auto)")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results.json",
        help="where to write the results (default: benchmarks/results.json)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: child run
    parser.add_argument("--split", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> None:
    if args.one:  # a child process: measure one network, print JSON
        print(json.dumps(bench_one(args.one, args, args.split)))
        return
    if not args.data.is_dir():
        sys.exit(f"throughput.py: error: no data at {args.data}; pass --data FOLDER")
    command = " ".join(["python benchmarks/throughput.py", *sys.argv[1:]])
    info = machine()
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        split = work / "split"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "split_data.py"),
                "--source",
                str(args.data),
                "--out",
                str(split),
            ],
            check=True,
            capture_output=True,
        )
        for name in args.models:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            child = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--split",
                str(split),
                "--warmup",
                str(args.warmup),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
                "--accuracy-image-size",
                str(args.accuracy_image_size),
            ]
            for flag in ("batch_size", "steps", "accuracy_epochs"):
                if getattr(args, flag):
                    child += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"throughput.py: error: {name} failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["predict"] = bench_predict(name, split, work)
            results.append(result)
            print(
                f"  {name}: {result['speedup']:.2f}x ({result['speedup_cache']:.2f}x with --cache)",
                file=sys.stderr,
                flush=True,
            )
    table = markdown(results, info, command)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": info, "command": command, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
