"""Predict the class of photos with the LeNet that lenet/train.py trained.

    $ python lenet/predict.py photo.jpg
    $ python lenet/predict.py photos/ more.png --topk 3
    $ python lenet/predict.py photos/ --json > predictions.json

Everything the model needs (architecture, class names, image size, mean and std) comes from
the checkpoint, and images go through train.py's validation preprocessing. Unreadable files
are named on stderr and the rest are still predicted; the exit code is 1 if any failed.
"""

import _thread
import argparse
import json
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

import torch
from matplotlib.figure import Figure
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2 as T
from tqdm import tqdm

from model import LeNet

FOLDER = Path(__file__).resolve().parent
FAMILY = "lenet"
DEFAULT_ARCH = "lenet"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_GRID = 25  # images drawn in the figure of a many-image run
# Grad-CAM looks at the last convolution: 10 x 10 at 32 pixels
CAM_LAYER = "conv2"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(arch=None)


def build_model(checkpoint: dict) -> nn.Module:
    model = LeNet(num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])  # strict: every tensor must fit
    return model


class PredictError(Exception):
    """A problem that stops the whole run, reported as one line without a traceback."""


def pick_device(name: str) -> torch.device:
    """The device --device names; a CUDA one with its index (the current GPU for "cuda")."""
    if name == "auto":
        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            problem = cuda_problem(index)
            if problem is None:
                return torch.device("cuda", index)
            print(f"note: {problem}; predicting on the CPU", file=sys.stderr)
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise PredictError(
            f"--device {name}: not a device this script runs on; use auto, cpu, cuda, cuda:N or mps"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise PredictError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                               f"CUDA device(s), numbered from 0")  # fmt: skip
        if problem := cuda_problem(index):
            raise PredictError(f"--device {name}: {problem}")
        device = torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PredictError("--device mps: MPS is not available here; use --device cpu")
    return device


def cuda_problem(index: int) -> str | None:
    """Why this PyTorch build cannot run on CUDA device index, or None if it can.

    A wheel carries kernels for a list of GPU generations (torch.cuda.get_arch_list()). Native
    code sm_XY runs where torch's own table says (later minor versions of X, but not Jetson's
    8.7 on sm_80, say); PTX compute_XY on X.Y and anything later. A GPU without kernels is
    listed by is_available() and fails at its first kernel.
    """
    major, minor = torch.cuda.get_device_capability(index)
    device_cc, archs = 10 * major + minor, torch.cuda.get_arch_list()
    # torch's rule (torch 2.8 on); before it, the same major version at this minor or below.
    native = getattr(torch.cuda, "_code_compatible_with_device", None)
    native = native or (lambda device, code: device // 10 == code // 10 and device >= code)
    for arch in archs:
        kind, _, version = arch.partition("_")
        code_cc = version.rstrip("af")  # sm_90a, sm_100f: the family variants of 9.0, 10.0
        if code_cc.isdigit():
            ptx = kind == "compute" and device_cc >= int(code_cc)
            if ptx or (kind == "sm" and native(device_cc, int(code_cc))):
                return None
    if not archs:
        return None  # nothing to check against
    return (
        f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no "
        f"kernels in this PyTorch build ({' '.join(archs)}); install a build whose "
        f"torch.cuda.get_arch_list() lists sm_{major}{minor}"
    )


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


def open_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Open an image the way users have them: any mode to RGB, EXIF rotation applied.

    predict.py reads images with this same function, so both scripts see the same pixels.
    Large photos are accepted as Pillow accepts them (a 108-megapixel phone photo is real);
    only what Pillow refuses as a decompression bomb is refused. With draft, a JPEG is decoded
    at a reduced scale (1/2 to 1/8) that keeps both sides at least draft pixels: much faster
    on large photos, with every detail the network can use. Raises ValueError with a short
    reason for anything that is not a whole, sane image.
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
                if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: turn it upright
                    img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too many pixels, refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ValueError("not an image Pillow can read") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"the image is damaged or truncated ({e})") from e
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
    """Softmax probabilities of every readable image, in batches; problems named per file.

    Each result is ((path, picture), probabilities); the picture is kept small (512 pixels at
    most), only for the figure.
    """
    results, problems = [], []
    batches = range(0, len(images), args.batch_size)
    bar = tqdm(batches, desc="predicting", unit="batch", disable=len(batches) < 2 or args.json)
    for start in bar:
        tensors, kept = [], []
        for path in images[start : start + args.batch_size]:
            try:
                picture = open_rgb(path, draft)
            except (ValueError, OSError) as e:
                problems.append(f"{path}: {e}")
                continue
            tensors.append(transform(picture))
            picture.thumbnail((512, 512))
            kept.append((path, picture))
        if not tensors:
            continue
        batch = torch.stack(tensors).to(device, memory_format=torch.channels_last)
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).float(), dim=1).cpu()
        results.extend(zip(kept, probabilities, strict=True))
    return results, problems


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Where in x the evidence for class target lies, as an x-sized map in [0, 1].

    Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) weights the
    activations of layer by the gradient of the target's logit and keeps the positive part of
    their sum over channels. This takes the gradient at each position rather than its mean per
    channel (HiResCAM, Draelos and Carin, 2020, https://arxiv.org/abs/2011.08891): the same map
    for networks that average-pool before the classifier (ResNet, GoogLeNet), and one that
    stays where the gradient is for those that flatten the feature map (LeNet, AlexNet, VGG).
    """
    saved = {}

    def keep(module, inputs, output):
        saved["activations"] = output
        output.register_hook(lambda grad: saved.update(gradients=grad))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            logits[0, target].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)  # the weights' gradients are not needed
    activations, gradients = saved["activations"].detach().float(), saved["gradients"].float()
    cam = torch.relu((gradients * activations).sum(1, keepdim=True))  # 1 x 1 x h x w
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).cpu()


def cams_for(model, results: list, target: str | None, classes, transform, draft, checkpoint,
             device) -> list[dict]:  # fmt: skip
    """Grad-CAM overlays of the images the figure shows: of the predicted class, or target."""
    layer = model.get_submodule(CAM_LAYER)
    mean = torch.tensor(checkpoint["mean"]).view(3, 1, 1)
    std = torch.tensor(checkpoint["std"]).view(3, 1, 1)
    cams = []
    for (file, _), probabilities in results[:MAX_GRID]:
        name = target or classes[probabilities.argmax().item()]
        x = transform(open_rgb(file, draft)).unsqueeze(0)
        heat = grad_cam(model, layer, x.to(device, memory_format=torch.channels_last),
                        classes.index(name))  # fmt: skip
        crop = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0)  # what the network saw
        cams.append({"crop": crop.numpy(), "heat": heat.numpy(), "class": name})
    return cams


def top_k(probabilities: torch.Tensor, classes: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probabilities.topk(k)
    return [(classes[i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def draw(results: list, classes: list[str], k: int, path: Path, show: bool, cams=None) -> None:
    """One image: the photo and a bar chart of its top k. Several: a grid of titled photos.

    With cams (the Grad-CAM overlays of the first images), they are drawn too: for one image
    between the photo and the bars, for several in place of the photos.
    """
    import matplotlib.pyplot as plt  # here, so that --json runs never load a GUI toolkit

    use_fonts_for(classes)
    if len(results) == 1:
        (file, picture), probabilities = results[0]
        ranked = top_k(probabilities, classes, k)
        panels = 3 if cams else 2
        widths = [1.2] * (panels - 1) + [1]
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.5),
                                 gridspec_kw={"width_ratios": widths})  # fmt: skip
        ax_img, ax_bar = axes[0], axes[-1]
        ax_img.imshow(picture)
        ax_img.set_title(f"{ranked[0][0]} ({ranked[0][1]:.1%})")
        ax_img.axis("off")
        if cams:
            show_cam(axes[1], cams[0])
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
        for i, (ax, ((file, picture), probabilities)) in enumerate(
            zip(axes.flat, shown, strict=False)
        ):
            name, p = top_k(probabilities, classes, 1)[0]
            if cams:
                show_cam(ax, cams[i])
            else:
                ax.imshow(picture)
            ax.set_title(f"{name} ({p:.0%})\n{file.name[:28]}", fontsize=9)
        if len(results) > len(shown):
            fig.suptitle(f"the first {len(shown)} of {len(results)} images")
    fig.tight_layout()
    save_figure(fig, path)
    if show and plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        plt.show()
    plt.close(fig)


def show_cam(ax, cam: dict) -> None:
    """The network's input crop with the Grad-CAM heat map over it (red: looked at most)."""
    ax.imshow(cam["crop"])
    ax.imshow(cam["heat"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(f"Grad-CAM: {cam['class']}")
    ax.axis("off")


def labelled_images(folder: Path, classes: list[str]) -> tuple[list[Path], dict, list[str]]:
    """The images of folder/<class>/..., the class index of each, and the problems found."""
    if not folder.is_dir():
        raise PredictError(f"--eval needs a folder of class sub-folders; {folder} is not one")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subfolders if p.name not in classes]
    if not subfolders or unknown:
        found = f"{', '.join(unknown)}: not a class of the checkpoint" if unknown else "none"
        raise PredictError(
            f"--eval {folder}: its sub-folders must be classes of the checkpoint "
            f"({', '.join(classes)}), one per class ({found}); move the others away"
        )
    images, labels, problems = [], {}, []
    for sub in subfolders:
        found, trouble = find_images([sub])
        images += found
        problems += trouble
        labels.update(dict.fromkeys(found, classes.index(sub.name)))
    return images, labels, problems


def score(results: list, labels: dict, classes: list[str], k: int) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1, confusion matrix, mistakes."""
    n = len(classes)
    true = torch.tensor([labels[file] for (file, _), _ in results])
    probabilities = torch.stack([p for _, p in results])
    predicted = probabilities.argmax(1)
    matrix = torch.bincount(true * n + predicted, minlength=n * n).reshape(n, n)
    in_top_k = (probabilities.topk(k, dim=1).indices == true[:, None]).any(1)
    per_class = {}
    for i, name in enumerate(classes):
        hits, support, called = matrix[i, i].item(), matrix[i].sum().item(), matrix[:, i].sum()
        precision = hits / called.item() if called else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": support}  # fmt: skip
    wrong = (predicted != true).nonzero().flatten().tolist()
    wrong.sort(key=lambda j: -probabilities[j, predicted[j]].item())  # most confident first
    return {
        "images": len(results),
        "accuracy": (predicted == true).float().mean().item(),
        "k": k,
        "top_k_accuracy": in_top_k.float().mean().item(),
        "classes": per_class,
        "confusion_matrix": matrix.tolist(),
        "misclassified": [
            {
                "file": str(results[j][0][0]),
                "true": classes[true[j]],
                "predicted": classes[predicted[j]],
                "probability": round(probabilities[j, predicted[j]].item(), 6),
            }
            for j in wrong
        ],  # fmt: skip
    }


def print_scores(scores: dict, folder: Path) -> None:
    print(f"{folder}: {scores['images']} images, accuracy {scores['accuracy']:.4f}, "
          f"top-{scores['k']} accuracy {scores['top_k_accuracy']:.4f}")  # fmt: skip
    width = max(len(name) for name in scores["classes"]) + 2
    print(f"{'class':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
    for name, c in scores["classes"].items():
        print(f"{name:<{width}}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>8.3f}"
              f"{c['support']:>9}")  # fmt: skip
    rows = scores["classes"].values()
    macro = [sum(c[m] for c in rows) / len(rows) for m in ("precision", "recall", "f1")]
    print(f"{'macro avg':<{width}}{macro[0]:>10.3f}{macro[1]:>8.3f}{macro[2]:>8.3f}"
          f"{scores['images']:>9}")  # fmt: skip


def write_evaluation(scores: dict, results: list, classes: list[str], out: Path) -> list[Path]:
    """The confusion matrix (PNG and CSV) and a gallery of the mistakes, in out."""
    matrix = torch.tensor(scores["confusion_matrix"])
    title = f"accuracy {scores['accuracy']:.3f} on {scores['images']} images"
    paths = [out / "confusion_matrix.png", out / "confusion_matrix.csv", out / "misclassified.png"]
    save_figure(confusion_figure(matrix, classes, title), paths[0])
    lines = [",".join(["true \\ predicted", *classes])]
    lines += [
        ",".join([name, *map(str, row)]) for name, row in zip(classes, matrix.tolist(), strict=True)
    ]
    write_file(paths[1], lambda f: f.write(("\n".join(lines) + "\n").encode()))

    pictures = {str(file): picture for (file, picture), _ in results}
    mistakes = scores["misclassified"][:MAX_GRID]
    cols = max(1, min(5, len(mistakes)))
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig = Figure(figsize=(3 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes, strict=False):
        ax.imshow(pictures[m["file"]])
        ax.set_title(f"true: {m['true']}\npredicted: {m['predicted']} ({m['probability']:.0%})"
                     f"\n{Path(m['file']).name[:28]}", fontsize=9)  # fmt: skip
    if not mistakes:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    total = len(scores["misclassified"])
    fig.suptitle(f"misclassified, most confident first: {len(mistakes)} of {total} shown")
    fig.tight_layout()
    save_figure(fig, paths[2])
    return paths


def write_file(path: Path, write) -> None:
    """Fill path atomically (write(f) fills a temporary file beside it, then a rename); a
    failure is one line, and no partial file stays behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise PredictError(f"cannot write {path} ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str) -> Figure:
    """The confusion matrix (rows: true class) with counts, shaded by each row's share."""
    use_fonts_for(classes)
    k = len(classes)
    fig = Figure(figsize=(0.8 * k + 3, 0.8 * k + 2))
    ax = fig.subplots()
    rows = matrix.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if matrix[i, j] > 0.5 * rows[i] else "black"
            ax.text(j, i, str(matrix[i, j].item()), ha="center", va="center", color=colour)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    write_file(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower(), dpi=100))


def check_save_path(save: Path | None, folder: bool) -> Path | None:
    """--save as a file to write (a folder gets the default name, a bare name gets .png), or
    with folder (--eval) as the folder for the outputs.

    Checked before any prediction, so that a bad --save costs nothing.
    """
    if save is None:
        return None
    save = save.expanduser().resolve()
    formats = Figure().canvas.get_supported_filetypes()
    if folder and save.exists() and not save.is_dir():
        raise PredictError(f"--save {save} is a file; with --eval it names a folder")
    if not folder and not save.is_dir() and save.suffix[1:].lower() not in ("", *formats):
        raise PredictError(
            f"--save {save}: matplotlib cannot write {save.suffix} files; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    above = save if save.is_dir() else save.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise PredictError(f"--save {save}: {above} is a file, not a folder")
    if not folder and not save.is_dir() and not save.suffix:
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
    add_model_args(parser)
    add_output_args(parser)
    add_mode_args(parser)
    add_run_args(parser)
    return parser


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output", "What is printed, and where the figure goes.")
    group.add_argument(
        "--topk",
        type=int,
        default=5,
        help="how many classes to list per image (default: 5, at most the number of classes)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout, nothing else (default: off)",
    )
    group.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to save the figure (default: prediction_<first image>.png "
        "in the checkpoint's folder)",
    )
    group.add_argument(
        "--no-show",
        action="store_true",
        help="never open a window (default: open one where a display exists)",
    )


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "scoring and explaining", "Instead of plain predictions: a scored folder, or Grad-CAM."
    )
    group.add_argument(
        "--eval",
        action="store_true",
        help="score a labelled folder (one sub-folder per class of the checkpoint): accuracy, "
        "top-k accuracy, per-class precision/recall/F1, and confusion_matrix.png/.csv and "
        "misclassified.png in eval_<folder>/ beside the checkpoint, or in --save DIR "
        "(default: off)",
    )
    group.add_argument(
        "--cam",
        action="store_true",
        help=f"draw where the network looks: Grad-CAM of the predicted class at layer "
        f"{CAM_LAYER}, over each photo of the figure (default: off)",
    )
    group.add_argument(
        "--cam-class",
        default=None,
        metavar="NAME",
        help="with --cam: the class to explain instead of the predicted one (default: none)",
    )


def add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running", "Where the network runs, and how many at once.")
    group.add_argument(
        "-b", "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    group.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default: auto: CUDA, then MPS, then CPU)",
    )


def main(args: argparse.Namespace) -> int:
    if args.topk < 1 or args.batch_size < 1:
        raise PredictError("--topk and --batch-size must be at least 1")
    if args.eval and (len(args.inputs) != 1 or args.cam or args.cam_class):
        raise PredictError("--eval takes one folder of class sub-folders, without --cam")
    save = check_save_path(args.save, folder=args.eval)
    weights = args.weights or FOLDER / "runs" / (args.arch or DEFAULT_ARCH) / "best.pth"
    weights = weights.expanduser().resolve()
    checkpoint = load_checkpoint(weights, args.arch)
    classes = checkpoint["classes"]
    if args.cam_class is not None and args.cam_class not in classes:
        raise PredictError(f"--cam-class {args.cam_class}: not one of {', '.join(classes)}")
    device = pick_device(args.device)
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

    if args.eval:
        images, labels, problems = labelled_images(args.inputs[0].expanduser(), classes)
    else:
        images, problems = find_images(args.inputs)
    results, unreadable = predict(model, images, transform, draft, device, args)
    problems += unreadable
    for problem in problems:
        print(f"{FAMILY}/predict.py: error: {problem}", file=sys.stderr)

    if args.eval:
        if not results:
            raise PredictError(f"no image of {args.inputs[0]} could be read")
        scores = score(results, labels, classes, k)
        out = save or weights.parent / f"eval_{args.inputs[0].expanduser().resolve().name}"
        written = write_evaluation(scores, results, classes, out)
        if args.json:
            print(json.dumps({**scores, "outputs": [str(p) for p in written]}, indent=2))
        else:
            print_scores(scores, args.inputs[0])
            print(f"saved {', '.join(p.name for p in written)} in {out}")
        return 1 if problems else 0

    print_predictions(results, classes, k, args.json)
    if results and (save or args.cam or not args.json):
        cams = None
        if args.cam or args.cam_class:
            if not args.json:
                print(f"Grad-CAM at layer {CAM_LAYER} ({FAMILY}'s last convolutional stage)")
            cams = cams_for(model, results, args.cam_class, classes, transform, draft,
                            checkpoint, device)  # fmt: skip
        default_name = f"prediction_{results[0][0][0].stem}.png"
        figure = save or weights.parent / default_name
        if figure.is_dir():
            figure = figure / default_name
        draw(results, classes, k, figure, show=not (args.no_show or args.json), cams=cams)
        if not args.json:
            print(f"figure saved to {figure}")
    return 1 if problems else 0


def print_predictions(results: list, classes: list[str], k: int, as_json: bool) -> None:
    if as_json:
        records = [
            {"file": str(file), "top": [{"class": c, "probability": round(p, 6)}
                                        for c, p in top_k(probabilities, classes, k)]}
            for (file, _), probabilities in results
        ]  # fmt: skip
        print(json.dumps(records, indent=2))
        return
    for (file, _), probabilities in results:
        ranked = top_k(probabilities, classes, k)
        print(f"{file}: {ranked[0][0]} {ranked[0][1]:.3f}")
        for rank, (name, p) in enumerate(ranked, 1):
            print(f"  {rank}. {name:<20} {p:.3f}")


def keep_ctrl_c(unraisable) -> None:
    """sys.unraisablehook that keeps Ctrl-C from being lost when it lands in a finalizer.

    Python ignores exceptions raised while an object is cleaned up (a progress bar's __del__,
    say), KeyboardInterrupt included, and the run would go on: interrupt again a moment later,
    outside the cleanup. Anything else is reported as Python would.
    """
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        again = threading.Timer(0.01, _thread.interrupt_main)
        again.daemon = True  # never holds up the exit
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


def exit_interrupted() -> NoReturn:
    """Exit with 130, the shell's code for Ctrl-C, printing nothing after our message.

    Ctrl-C can land inside a constructor (a progress bar's, say): the half-built object then
    fails its cleanup as Python exits, and that traceback would bury the message.
    """
    sys.unraisablehook = lambda unraisable: None
    sys.exit(130)


if __name__ == "__main__":
    sys.unraisablehook = keep_ctrl_c
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except PredictError as e:
        sys.exit(f"{FAMILY}/predict.py: error: {e}")
    except KeyboardInterrupt:
        print(f"\n{FAMILY}/predict.py: interrupted", file=sys.stderr)
        exit_interrupted()
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
