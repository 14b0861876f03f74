"""Predict the class of photos with the GoogLeNet that googlenet/train.py trained.

    $ python googlenet/predict.py photo.jpg
    $ python googlenet/predict.py photos/ more.png --topk 3
    $ python googlenet/predict.py photos/ --json > predictions.json

Everything the model needs (architecture, class names, image size, mean and std) comes from
the checkpoint, and images go through train.py's validation preprocessing. Unreadable files
are named on stderr and the rest are still predicted; the exit code is 1 if any failed.
"""

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2 as T
from tqdm import tqdm

from model import GoogLeNet, without_aux

FOLDER = Path(__file__).resolve().parent
FAMILY = "googlenet"
DEFAULT_ARCH = "googlenet"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_GRID = 25  # images drawn in the figure of a many-image run


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(arch=None)


def build_model(checkpoint: dict) -> nn.Module:
    """The inference network: no auxiliary heads, so exactly their weights are dropped."""
    model = GoogLeNet(num_classes=len(checkpoint["classes"]), aux_logits=False, init_weights=False)
    model.load_state_dict(without_aux(checkpoint["model"]))  # strict: the rest must fit
    return model


class PredictError(Exception):
    """A problem that stops the whole run, reported as one line without a traceback."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise PredictError(f"--device {name}: not a device this script runs on; use auto, cpu, "
                           f"cuda, cuda:N or mps")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PredictError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s), numbered from 0")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PredictError("--device mps: MPS is not available here; use --device cpu")
    return device


def load_checkpoint(path: Path, expected_arch: str | None) -> dict:
    """Read a checkpoint of this family; never unpickles arbitrary objects."""
    if not path.is_file():
        arch = expected_arch or DEFAULT_ARCH
        raise PredictError(
            f"no checkpoint at {path}: train one first with `{train_command(arch)}`, "
            f"or pass --weights PATH"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but plain data, with varied errors
        raise PredictError(
            f"{path} is not a checkpoint this script can read (only tensors and plain values "
            f"are loaded, never other objects)"
        ) from e
    if not isinstance(checkpoint, dict) or not {"model", "family", "classes"} <= set(checkpoint):
        raise PredictError(f"{path} is not a checkpoint written by a train.py of this project")
    if checkpoint["family"] != FAMILY:
        raise PredictError(
            f"{path} holds {checkpoint.get('arch')} of the {checkpoint['family']} folder, not "
            f"a {FAMILY} network; use {checkpoint['family']}/predict.py"
        )
    if expected_arch is not None and checkpoint["arch"] != expected_arch:
        raise PredictError(
            f"{path} holds {checkpoint['arch']}, but --arch {expected_arch} was asked for; "
            f"drop --arch or pass the matching --weights"
        )
    return checkpoint


def train_command(arch: str) -> str:
    arch_flag = f" --arch {arch}" if arch != DEFAULT_ARCH else ""
    return f"python {FAMILY}/train.py{arch_flag}"


def val_transform(image_size: int, mean: list[float], std: list[float]) -> T.Compose:
    """Exactly train.py's validation preprocessing."""
    return T.Compose(
        [
            T.Resize(round(image_size / 0.875), antialias=True),
            T.CenterCrop(image_size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def find_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """The image files named or found (recursively, sorted) in folders, and the problems."""
    files, problems = [], []
    for path in inputs:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            if not found:
                problems.append(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def load_image(path: Path, draft: int | None = None) -> Image.Image:
    """Open an image the way users have them: any mode to RGB, EXIF rotation applied.

    Large photos are accepted as Pillow accepts them (a 108-megapixel phone photo is real);
    only what Pillow refuses as a decompression bomb is refused. With draft, a JPEG is
    decoded at a reduced scale that keeps both sides at least draft pixels, as train.py does.
    Raises ValueError with a short reason for anything that is not a whole, sane image.
    """
    if path.stat().st_size == 0:
        raise ValueError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft:
                    img.draft("RGB", (draft, draft))
                img.seek(0)  # the first frame of a GIF or other animation
                img.load()
                img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"too many pixels, refused as a possible decompression bomb ({e})"
        ) from None
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"the image is damaged or truncated ({e})") from None
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")  # 16-bit to 8-bit
    elif img.mode == "F":
        img = img.point(lambda v: v * 255).convert("L")  # floats in [0, 1]
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)  # transparent parts become white
    return img.convert("RGB")


def predict(model, images: list[Path], transform, draft, device, args) -> tuple[list, list[str]]:
    """Softmax probabilities of every readable image, in batches; problems named per file."""
    results, problems = [], []
    batches = range(0, len(images), args.batch_size)
    bar = tqdm(batches, desc="predicting", unit="batch", disable=len(batches) < 2 or args.json)
    for start in bar:
        tensors, kept = [], []
        for path in images[start : start + args.batch_size]:
            try:
                picture = load_image(path, draft)
            except ValueError as e:
                problems.append(f"{path}: {e}")
                continue
            tensors.append(transform(picture))
            kept.append((path, picture))
        if not tensors:
            continue
        batch = torch.stack(tensors).to(device, memory_format=torch.channels_last)
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).float(), dim=1).cpu()
        results.extend(zip(kept, probabilities, strict=True))
    return results, problems


def top_k(probabilities: torch.Tensor, classes: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probabilities.topk(k)
    return [(classes[i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def draw(results: list, classes: list[str], k: int, path: Path, show: bool) -> None:
    """One image: the photo and a bar chart of its top k. Several: a grid of titled photos."""
    import matplotlib.pyplot as plt  # here, so that --json runs never load a GUI toolkit

    use_fonts_for(classes)
    if len(results) == 1:
        (file, picture), probabilities = results[0]
        ranked = top_k(probabilities, classes, k)
        fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(10, 4.5),
                                             gridspec_kw={"width_ratios": [1.2, 1]})  # fmt: skip
        ax_img.imshow(picture)
        ax_img.set_title(f"{ranked[0][0]} ({ranked[0][1]:.1%})")
        ax_img.axis("off")
        names, values = zip(*reversed(ranked), strict=True)
        ax_bar.barh(names, values, color="tab:blue")
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("probability")
        ax_bar.set_title(file.name)
    else:
        shown = results[:MAX_GRID]
        cols = min(5, len(shown))
        rows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, ((file, picture), probabilities) in zip(axes.flat, shown, strict=False):
            name, p = top_k(probabilities, classes, 1)[0]
            ax.imshow(picture)
            ax.set_title(f"{name} ({p:.0%})\n{file.name[:28]}", fontsize=9)
        if len(results) > len(shown):
            fig.suptitle(f"the first {len(shown)} of {len(results)} images")
    fig.tight_layout()
    save_figure(fig, path)
    if show and plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        plt.show()
    plt.close(fig)


def save_figure(fig, path: Path) -> None:
    """Write the figure atomically; a failure is one line, and no partial file stays behind."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        raise PredictError(f"cannot save the figure to {path} ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)


def check_save_path(save: Path | None) -> Path | None:
    """--save as a file to write: a folder gets the default name, a bare name gets .png.

    Checked before any prediction, so that a bad --save costs nothing.
    """
    if save is None:
        return None
    from matplotlib.figure import Figure

    save = save.expanduser().resolve()
    formats = Figure().canvas.get_supported_filetypes()
    if not save.is_dir() and save.suffix and save.suffix[1:].lower() not in formats:
        raise PredictError(
            f"--save {save}: matplotlib cannot write {save.suffix} files; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    above = save if save.is_dir() else save.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise PredictError(f"--save {save}: {above} is a file, not a folder")
    if not save.is_dir() and not save.suffix:
        save = save.with_suffix(".png")
    return save


def use_fonts_for(texts: list[str]) -> None:
    """Let matplotlib draw texts (class names in any script) with an installed font.

    DejaVu Sans, matplotlib's own, has no Chinese, Japanese or Korean; the first installed
    regular font that has the missing characters becomes its fallback. With none, one note
    instead of a warning per missing character.
    """
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    def characters(path: str) -> set[str]:
        try:
            return set(map(chr, FT2Font(path).get_charmap()))
        except (OSError, RuntimeError):
            return set()

    missing = {c for text in texts for c in text if not c.isspace()}
    missing -= characters(font_manager.findfont("DejaVu Sans"))
    if not missing:
        return
    for font in font_manager.fontManager.ttflist:
        regular = font.style == "normal" and font.weight in (400, "normal", "regular")
        if regular and "Last Resort" not in font.name and missing <= characters(font.fname):
            rcParams["font.family"] = ["DejaVu Sans", font.name]
            return
    warnings.filterwarnings("ignore", message="Glyph .* missing from")
    print(
        f"note: no installed font has the characters {''.join(sorted(missing))[:20]}; the "
        f"figures show boxes for them (install a font such as Noto Sans CJK)",
        file=sys.stderr,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="IMAGE_OR_FOLDER",
        help="image files and/or folders (searched recursively for images)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"checkpoint written by train.py (default: {FAMILY}/runs/<arch>/best.pth)",
    )
    parser.add_argument(
        "--topk",
        type=int,
        default=5,
        help="how many classes to list per image (default: 5, at most the number of classes)",
    )
    parser.add_argument(
        "-b", "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default: auto: CUDA, then MPS, then CPU)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout, nothing else (default: off)",
    )
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to save the figure (default: prediction_<first image>.png "
        "in the checkpoint's folder)",
    )
    parser.add_argument(
        "--no-show",
        action="store_true",
        help="never open a window (default: open one where a display exists)",
    )
    add_model_args(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.topk < 1 or args.batch_size < 1:
        raise PredictError("--topk and --batch-size must be at least 1")
    save = check_save_path(args.save)
    weights = args.weights or FOLDER / "runs" / (args.arch or DEFAULT_ARCH) / "best.pth"
    weights = weights.expanduser().resolve()
    checkpoint = load_checkpoint(weights, args.arch)
    device = pick_device(args.device)
    classes = checkpoint["classes"]
    try:
        model = build_model(checkpoint)
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise PredictError(f"{weights} does not fit {checkpoint.get('arch')}: {detail}") from e
    model = model.to(device, memory_format=torch.channels_last).eval()
    image_size = checkpoint["image_size"]
    transform = val_transform(image_size, checkpoint["mean"], checkpoint["std"])
    draft = 2 * round(image_size / 0.875)  # as train.py decodes its validation JPEGs
    k = min(args.topk, len(classes))

    images, problems = find_images(args.inputs)
    results, unreadable = predict(model, images, transform, draft, device, args)
    problems += unreadable
    for problem in problems:
        print(f"{FAMILY}/predict.py: error: {problem}", file=sys.stderr)

    if args.json:
        records = [
            {"file": str(file), "top": [{"class": c, "probability": round(p, 6)}
                                        for c, p in top_k(probabilities, classes, k)]}
            for (file, _), probabilities in results
        ]  # fmt: skip
        print(json.dumps(records, indent=2))
    else:
        for (file, _), probabilities in results:
            ranked = top_k(probabilities, classes, k)
            print(f"{file}: {ranked[0][0]} {ranked[0][1]:.3f}")
            for rank, (name, p) in enumerate(ranked, 1):
                print(f"  {rank}. {name:<20} {p:.3f}")
    if results and (save or not args.json):
        default_name = f"prediction_{results[0][0][0].stem}.png"
        figure = save or weights.parent / default_name
        if figure.is_dir():
            figure = figure / default_name
        draw(results, classes, k, figure, show=not (args.no_show or args.json))
        if not args.json:
            print(f"figure saved to {figure}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except PredictError as e:
        sys.exit(f"{FAMILY}/predict.py: error: {e}")
    except KeyboardInterrupt:
        print(f"\n{FAMILY}/predict.py: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
