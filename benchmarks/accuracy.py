"""Held-out accuracy of each folder's training, side by side with the classic tutorial recipe.

    $ python benchmarks/accuracy.py                 # five folders, 5 folds x 3 seeds, 30 epochs
    $ python benchmarks/accuracy.py --folders lenet alexnet --folds 3 --seeds 0 --epochs 10
    $ python benchmarks/accuracy.py --data ~/my_photos --image-size 160 vgg=112
    $ python benchmarks/accuracy.py --folders lenet --ours-args="--lr 1e-3" --name lr1e-3

The photos of --data (one sub-folder per class) are cut into --folds stratified folds, the same
for every recipe and seed. Each fold in turn is the test set; the other folds are the training
part, from which a validation set (--val-ratio of each class, at least one photo) is carved the
way split_data.py carves val/. On that split, for each seed:
  classic: the recipe of the tutorials this project descends from, on the folder's model.py:
      fp32, RandomResizedCrop + horizontal flip + ToTensor + Normalize, evaluation Resize((s, s)),
      Adam at a constant lr, the epoch with the best val accuracy kept (the earliest of ties).
      The photos are decoded once and kept in memory: the same images, only faster.
  ours: the folder's real train.py as a user runs it (--data-path, --epochs, --seed, and
      --ours-args), then its predict.py --eval on the test fold.
Both recipes are scored on the test fold with the weights they keep (best on val) and with the
last epoch's. Every photo is tested once per seed: the table gives, per folder and recipe, the
mean over seeds of the accuracy on all photos and its standard deviation over seeds, and how
many folds ours matches or beats classic on (seed means). Finished runs are written to the JSON
as they end; running the same command again continues where it stopped (--fresh starts over).
"""

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from throughput import load_train_py, machine

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "flower_sample"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# folder -> the classic tutorial recipe: (network, Adam's learning rate, batch size, image size).
CLASSIC = {
    "lenet": ("lenet", 1e-3, 36, 32),
    "alexnet": ("alexnet", 2e-4, 32, 224),
    "vgg": ("vgg16", 1e-4, 32, 224),
    "googlenet": ("googlenet", 3e-4, 32, 224),
    "resnet": ("resnet34", 1e-4, 16, 224),
}
RECIPES = ("classic", "ours")


class BenchmarkError(Exception):
    """A problem with the benchmark's input, reported in one line."""


def list_photos(data: Path) -> dict[str, list[Path]]:
    """Class name -> its photos, sorted, as ImageFolder would find them (first level only)."""
    if not data.is_dir():
        raise BenchmarkError(f"--data {data}: no such folder (one sub-folder of photos per class)")
    classes = {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        if files:
            classes[folder.name] = files
    if len(classes) < 2:
        raise BenchmarkError(f"--data {data}: needs at least two class sub-folders with photos")
    return classes


def make_folds(photos: dict[str, list[Path]], k: int) -> list[dict[str, list[Path]]]:
    """k stratified folds: each class shuffled (fixed seed) and dealt out in turn."""
    smallest = min(len(files) for files in photos.values())
    if k < 2 or k > smallest:
        raise BenchmarkError(
            f"--folds {k}: must be from 2 to the smallest class's size, {smallest}"
        )
    folds = [defaultdict(list) for _ in range(k)]
    rng = random.Random(0)
    start = 0
    for name, files in photos.items():
        files = files[:]
        rng.shuffle(files)
        for i, file in enumerate(files):
            folds[(start + i) % k][name].append(file)
        start += len(files)  # the next class's remainder goes to other folds: sizes stay even
    return [dict(fold) for fold in folds]


def carve_val(train_part: dict[str, list[Path]], ratio: float, fold: int):
    """split_data.py's val: a shuffled share of each class (at least one photo)."""
    rng = random.Random(fold)
    train, val = {}, {}
    for name, files in train_part.items():
        files = sorted(files)
        rng.shuffle(files)
        n = max(1, round(len(files) * ratio))
        val[name], train[name] = files[:n], files[n:]
    return train, val


def write_split(split: Path, parts: dict[str, dict[str, list[Path]]]) -> None:
    """split/train, split/val and split/test as class folders of copies of the photos."""
    for part, classes in parts.items():
        for name, files in classes.items():
            folder = split / part / name
            folder.mkdir(parents=True)
            for file in files:
                shutil.copyfile(file, folder / file.name)


def run_ours(folder: str, split: Path, out: Path, seed: int, args: argparse.Namespace) -> dict:
    """The folder's train.py, then its predict.py --eval on the test fold, as subprocesses."""
    import torch

    train = [
        sys.executable,
        str(ROOT / folder / "train.py"),
        "--data-path",
        str(split),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
    ]
    size = image_size(folder, args)
    if size != CLASSIC[folder][3]:
        train += ["--image-size", str(size)]
    train += shlex.split(args.ours_args)
    finished = subprocess.run(train, capture_output=True, text=True)
    if finished.returncode != 0:
        raise BenchmarkError(f"{shlex.join(train)} failed: {finished.stderr.strip()[-500:]}")
    with open(out / "metrics.csv") as f:
        rows = [line.rstrip("\n").split(",") for line in f]
    column = rows[0].index("val_acc")
    val = [float(row[column]) for row in rows[1:]]
    best_epoch = val.index(max(val)) + 1  # the earliest of tied epochs
    # best.pth holds the last epoch (train.py keeps it); older runs kept the best on val.
    kept_epoch = torch.load(out / "best.pth", mmap=True, weights_only=True)["epoch"]
    scores = {}
    for kept in ("best", "last") if kept_epoch < len(val) else ("best",):
        predict = [
            sys.executable,
            str(ROOT / folder / "predict.py"),
            str(split / "test"),
            "--eval",
            "--json",
            "--weights",
            str(out / f"{kept}.pth"),
            "--save",
            str(out / kept),
        ]
        finished = subprocess.run(predict, capture_output=True, text=True)
        if finished.returncode != 0:
            raise BenchmarkError(f"{shlex.join(predict)} failed: {finished.stderr.strip()[-500:]}")
        scores[kept] = json.loads(finished.stdout)["accuracy"]
    return {
        "test_acc": scores["best"],
        "test_acc_last": scores.get("last", scores["best"]),
        "best_val_acc": max(val),
        "best_epoch": best_epoch,
        "kept_epoch": kept_epoch,
    }


def run_classic(folder: str, split: Path, seed: int, args: argparse.Namespace) -> dict:
    """The classic tutorial loop on the folder's model.py, in this process."""
    import torch
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import transforms as classic_t

    arch, lr, batch, _ = CLASSIC[folder]
    size = image_size(folder, args)
    train_py = load_train_py(folder)
    parser = train_py.get_args_parser()
    model_args = parser.parse_args(
        ["--image-size", str(size)]
        + (["--arch", arch] if "--arch" in parser.format_usage() else [])
    )
    torch.manual_seed(seed)
    random.seed(seed)
    classes = sorted(p.name for p in (split / "train").iterdir())
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = classic_t.Compose(
        [
            classic_t.RandomResizedCrop(size),
            classic_t.RandomHorizontalFlip(),
            classic_t.ToTensor(),
            classic_t.Normalize(mean, std),
        ]
    )
    eval_tf = classic_t.Compose(
        [classic_t.Resize((size, size)), classic_t.ToTensor(), classic_t.Normalize(mean, std)]
    )

    def photos(part: str) -> list:
        return [
            (Image.open(f).convert("RGB"), label)
            for label, name in enumerate(classes)
            for f in sorted((split / part / name).iterdir())
        ]

    class Photos(torch.utils.data.Dataset):
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            image, label = self.items[i]
            return self.transform(image), label

    train_loader = DataLoader(Photos(photos("train"), train_tf), batch_size=batch, shuffle=True)
    val_loader = DataLoader(Photos(photos("val"), eval_tf), batch_size=batch)
    test_loader = DataLoader(Photos(photos("test"), eval_tf), batch_size=batch)
    model = train_py.build_model(model_args, len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()

    def accuracy(loader) -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for images, targets in loader:
                right += (model(images).argmax(1) == targets).sum().item()
        return right / len(loader.dataset)

    best_acc, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        for images, targets in train_loader:
            loss, _ = train_py.compute_loss(model(images), targets, criterion)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc = accuracy(val_loader)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    last = accuracy(test_loader)
    model.load_state_dict(best_state)
    return {
        "test_acc": accuracy(test_loader),
        "test_acc_last": last,
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
    }


def check_image_sizes(args: argparse.Namespace) -> None:
    """Before hours of runs: each folder's network takes its image size (GoogLeNet's auxiliary
    heads need at least 96 px, for one)."""
    import torch

    for folder in args.folders:
        size = image_size(folder, args)
        train_py = load_train_py(folder)
        parser = train_py.get_args_parser()
        model = train_py.build_model(parser.parse_args([]), 2).train()
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, size, size))
        except RuntimeError as e:
            raise BenchmarkError(
                f"--image-size {size} is too small for {folder}'s network "
                f"({' '.join(str(e).split())[:120]})"
            ) from e


def image_size(folder: str, args: argparse.Namespace) -> int:
    if folder == "lenet":
        return CLASSIC["lenet"][3]  # LeNet's layers take 32 x 32 only
    return args.sizes.get(folder, args.sizes.get("*", CLASSIC[folder][3]))


def parse_sizes(tokens: list[str]) -> dict[str, int]:
    """'160' sets every folder but lenet, 'vgg=112' one folder."""
    sizes = {}
    for token in tokens:
        folder, _, value = token.rpartition("=")
        if folder and folder not in CLASSIC:
            raise BenchmarkError(
                f"--image-size {token}: {folder} is not one of {', '.join(CLASSIC)}"
            )
        if not value.isdigit() or int(value) < 32:
            raise BenchmarkError(f"--image-size {token}: the size must be a whole number >= 32")
        sizes[folder or "*"] = int(value)
    return sizes


def summarise(runs: list[dict]) -> list[dict]:
    """Per folder and recipe: accuracy on all photos per seed, mean and std over seeds."""
    folders = [f for f in CLASSIC if any(r["folder"] == f for r in runs)]
    recipes = sorted({r["recipe"] for r in runs}, key=lambda name: (name != "classic", name))
    rows = []
    for folder in folders:
        for recipe in recipes:
            mine = [r for r in runs if r["folder"] == folder and r["recipe"] == recipe]
            if not mine:
                continue
            row = {
                "folder": folder,
                "recipe": recipe,
                "runs": len(mine),
                "ours_args": mine[0].get("ours_args"),
                "image_size": mine[0]["image_size"],
            }
            for key in ("test_acc", "test_acc_last"):
                per_seed = defaultdict(lambda: [0, 0])
                for r in mine:
                    per_seed[r["seed"]][0] += r[key] * r["n_test"]
                    per_seed[r["seed"]][1] += r["n_test"]
                accs = [right / n for right, n in per_seed.values()]
                row[key] = statistics.mean(accs)
                row[key + "_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            per_fold = defaultdict(list)
            for r in mine:
                per_fold[r["fold"]].append(r["test_acc"])
            row["per_fold"] = {fold: statistics.mean(a) for fold, a in sorted(per_fold.items())}
            row["best_val_acc"] = statistics.mean(r["best_val_acc"] for r in mine)
            rows.append(row)
    for row in rows:
        if row["recipe"] != "classic":
            classic = next(
                (c for c in rows if c["folder"] == row["folder"] and c["recipe"] == "classic"), None
            )
            if classic:
                folds = set(row["per_fold"]) & set(classic["per_fold"])
                row["gain"] = row["test_acc"] - classic["test_acc"]
                # predict.py counts in float32: 0.46 arrives as 0.45999999
                row["folds_not_worse"] = (
                    sum(row["per_fold"][f] >= classic["per_fold"][f] - 1e-6 for f in folds),
                    len(folds),
                )
    return rows


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"Held-out accuracy, {config['folds']}-fold x seeds {config['seeds']}, "
        f"{config['epochs']} epochs, on {config['photos']} photos of {config['data']}",
        "",
        f"    $ {report['command']}",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
        f"{report['machine']['torch']}, {report['machine']['date']}.",
        "",
        "| folder | network, image size | recipe | test acc (kept weights) | last epoch | "
        "folds ours >= classic | mean best val acc |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["summary"]:
        folder = row["folder"]
        net = f"{CLASSIC[folder][0]}, {row['image_size']} px"
        folds = "{}/{}".format(*row["folds_not_worse"]) if "folds_not_worse" in row else "-"
        gain = f" ({row['gain']:+.3f})" if "gain" in row else ""
        recipe = row["recipe"] + (f" `{row['ours_args']}`" if row["ours_args"] else "")
        lines.append(
            f"| {folder} | {net} | {recipe} | {row['test_acc']:.3f} ± "
            f"{row['test_acc_std']:.3f}{gain} | {row['test_acc_last']:.3f} ± "
            f"{row['test_acc_last_std']:.3f} | {folds} | {row['best_val_acc']:.3f} |"
        )
    lines += ["", "± is the standard deviation over seeds of the accuracy on all photos."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=SAMPLE,
        help="photos, one sub-folder per class (default: data/flower_sample)",
    )
    parser.add_argument(
        "--folders",
        nargs="+",
        choices=list(CLASSIC),
        default=list(CLASSIC),
        help="which folders (default: all five)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=RECIPES,
        default=list(RECIPES),
        help="which recipes (default: both)",
    )
    parser.add_argument("--folds", type=int, default=5, help="k of the k-fold (default: 5)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default: 30)")
    parser.add_argument(
        "--val-ratio",
        type=float,
        default=0.1,
        help="share of each class of the training part kept for val (default: 0.1)",
    )
    parser.add_argument(
        "--image-size",
        nargs="+",
        default=[],
        metavar="[FOLDER=]N",
        help="image size of both recipes: N for every folder but lenet (32 px "
        "only), FOLDER=N for one (default: each recipe's, 224)",
    )
    parser.add_argument(
        "--ours-args",
        default="",
        help="more train.py flags for ours, in one string (default: none)",
    )
    parser.add_argument(
        "--name", default="ours", help="the row name of ours, for ablations (default: ours)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "accuracy",
        help="writes OUT.json and OUT.md (default: benchmarks/accuracy)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the runs OUT.json already holds (default: continue them)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    args.sizes = parse_sizes(args.image_size)
    data = args.data.expanduser().resolve()
    photos = list_photos(data)
    folds = make_folds(photos, args.folds)
    check_image_sizes(args)
    config = {
        "data": str(data),
        "photos": sum(map(len, photos.values())),
        "folds": args.folds,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "val_ratio": args.val_ratio,
    }
    out_json = args.out.with_suffix(".json")
    runs = []
    if out_json.is_file() and not args.fresh:
        previous = json.loads(out_json.read_text())
        if previous.get("config") == config:
            runs = previous["runs"]
            print(f"continuing {out_json}: {len(runs)} runs already done (--fresh starts over)")
    recipes = [args.name if r == "ours" else r for r in args.recipes]
    for r in runs:
        if r["recipe"] == args.name and r.get("ours_args") != args.ours_args:
            raise BenchmarkError(
                f"{out_json} holds runs named {args.name} with --ours-args="
                f"{r.get('ours_args')!r}: pick another --name, or --fresh"
            )
    done = {(r["folder"], r["recipe"], r["fold"], r["seed"], r["image_size"]) for r in runs}
    report = {
        "command": shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]),
        "machine": machine(),
        "config": config,
    }

    plan = [
        (folder, recipe, fold, seed)
        for folder in args.folders
        for fold in range(args.folds)
        for seed in args.seeds
        for recipe in recipes
    ]
    with tempfile.TemporaryDirectory(prefix="accuracy_") as tmp:
        for n, (folder, recipe, fold, seed) in enumerate(plan, 1):
            key = (folder, recipe, fold, seed, image_size(folder, args))
            if key in done:
                continue
            split = Path(tmp) / f"fold{fold}"
            if not split.exists():
                test = folds[fold]
                rest = {
                    name: [
                        f for i, part in enumerate(folds) if i != fold for f in part.get(name, [])
                    ]
                    for name in photos
                }
                train, val = carve_val(rest, args.val_ratio, fold)
                write_split(split, {"train": train, "val": val, "test": test})
            started = time.perf_counter()
            if recipe == "classic":
                result = run_classic(folder, split, seed, args)
            else:
                out = Path(tmp) / f"{folder}_{fold}_{seed}"
                result = run_ours(folder, split, out, seed, args)
                shutil.rmtree(out)
            if recipe != "classic":
                result["ours_args"] = args.ours_args
            result.update(
                folder=folder,
                recipe=recipe,
                fold=fold,
                seed=seed,
                image_size=key[4],
                n_test=sum(map(len, folds[fold].values())),
                seconds=round(time.perf_counter() - started, 1),
            )
            runs.append(result)
            print(
                f"[{n}/{len(plan)}] {folder} {recipe} fold {fold} seed {seed}: test acc "
                f"{result['test_acc']:.3f} (last epoch {result['test_acc_last']:.3f}), best "
                f"val {result['best_val_acc']:.3f} at epoch {result['best_epoch']}, "
                f"{result['seconds']:.0f} s",
                flush=True,
            )
            report.update(runs=runs, summary=summarise(runs))
            write_report(report, args.out)
    report.update(runs=runs, summary=summarise(runs))
    write_report(report, args.out)
    print(markdown(report), end="")
    print(f"written to {out_json} and {args.out.with_suffix('.md')}")


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
        temporary = out.with_suffix(suffix + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, out.with_suffix(suffix))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except BenchmarkError as e:
        sys.exit(f"benchmarks/accuracy.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
