"""Re-make the pictures of the README's "Reading the results" from the sample photos.

    $ python docs/make_figures.py                 # about 5 minutes on 2 CPU cores

Runs the project's own scripts as a user would, in a temporary folder: split_data.py splits
data/flower_sample (or --source) 8:1:1 into train/val/test, resnet/train.py
trains a resnet18 at 128 pixels, predict.py --eval scores the test photos and predict.py --cam
explains one of them. The figures they write are copied into docs/ unchanged.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SAMPLE = ROOT / "data" / "flower_sample"


def run(*args) -> str:
    """Run one of the project's scripts, show its command (relative to the repo), return stdout."""
    shown = [
        str(a.relative_to(ROOT)) if isinstance(a, Path) and a.is_relative_to(ROOT) else a
        for a in args
    ]
    print("$ python " + " ".join(map(str, shown)), flush=True)
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        env={"MPLBACKEND": "Agg", **_env()},
    )
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(f"docs/make_figures.py: error: the command above failed ({result.returncode})")
    return result.stdout


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "DISPLAY"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=SAMPLE,
        help="photos, one folder per class (default: data/flower_sample, the project's own photos)",
    )
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"docs/make_figures.py: error: no photos at {args.source}; pass --source DIR")
    work = Path(tempfile.mkdtemp(prefix="make_figures-"))
    try:
        data, out = work / "data", work / "run"
        run(ROOT / "split_data.py", "--source", args.source, "--out", data, "--test-ratio", "0.1")
        run(
            ROOT / "resnet" / "train.py",
            "--data-path",
            data,
            "--arch",
            "resnet18",
            "--image-size",
            "128",
            "--epochs",
            args.epochs,
            "--cache",
            "on",
            "--output-dir",
            out,
        )
        run(
            ROOT / "resnet" / "predict.py",
            data / "test",
            "--eval",
            "--topk",
            "2",
            "--weights",
            out / "best.pth",
            "--save",
            work / "eval",
        )
        photo = sorted((data / "test" / "sunflowers").iterdir())[0]
        run(
            ROOT / "resnet" / "predict.py",
            photo,
            "--cam",
            "--topk",
            "3",
            "--weights",
            out / "best.pth",
            "--save",
            work / "gradcam.png",
        )
        DOCS.mkdir(exist_ok=True)
        for source, name in (
            (out / "curves.png", "curves.png"),
            (work / "eval" / "confusion_matrix.png", "confusion_matrix.png"),
            (work / "eval" / "misclassified.png", "misclassified.png"),
            (work / "gradcam.png", "gradcam.png"),
        ):
            shutil.copyfile(source, DOCS / name)
            print(f"docs/{name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
