"""Predict the class of photos with the VGG that vgg/train.py trained.

    $ python vgg/predict.py photo.jpg
    $ python vgg/predict.py photos/ more.png --topk 3
    $ python vgg/predict.py photos/ --json > predictions.json
    $ python vgg/predict.py photo.jpg --arch vgg16_bn      # runs/vgg16_bn/best.pth
    $ python vgg/predict.py photo.jpg --cam             # where the network looks
    $ python vgg/predict.py data/flower_data/val --eval # accuracy, per class, mistakes
    $ python vgg/predict.py photo.jpg --feature-maps    # filters, and what each stage sees

The checkpoint holds all the network needs; photos go through train.py's validation steps.
Unreadable files are named on stderr, the rest predicted (exit code 1). See docs/prediction.md.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): stop, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import ImageOps
from torch import nn
from torchvision.utils import make_grid
from tqdm import tqdm

import utils
from model import ARCHS, STAGES
from train import val_transform
from utils import UserError

FOLDER = Path(__file__).resolve().parent
FAMILY = "vgg"
DEFAULT_ARCH = "vgg16"
# Grad-CAM looks at the last convolutional stage: 7 x 7 at 224 pixels
CAM_LAYER = "features"
MAX_GRID = 25  # photos drawn in a figure


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=list(ARCHS), help="read runs/<arch>/best.pth")


def build_model(checkpoint: dict) -> nn.Module:
    model = ARCHS[checkpoint["arch"]](num_classes=len(checkpoint["classes"]), init_weights=False)
    model.load_state_dict(checkpoint["model"])  # strict: every tensor must fit
    return model


def find_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """The photos named, or found in folders as train.py finds them (utils.find_photos)."""
    files, problems = [], []
    for path in inputs:
        found = [path] if path.is_file() else utils.find_photos(path) if path.is_dir() else []
        files += found
        problems += [] if found else [f"{path}: no such file, or no photos in the folder"]
    return files, problems


def labelled_images(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor, list]:
    """The photos of folder/<class>/ as train.py finds them (utils.PhotoFolder), and labels."""
    try:
        found = utils.PhotoFolder(folder, allow_empty=True)
    except OSError:  # not a folder, or no class folders in it
        found = None
    unknown = sorted(set(found.classes) - set(classes)) if found else []
    if found is None or unknown:
        unknown = ", ".join(utils.printable(name) for name in unknown)
        problem = f"{unknown or 'no class sub-folders'}: not a class of the checkpoint"
        raise UserError(f"--eval {folder}: {problem}; pass a folder of class sub-folders")
    empty = set(found.classes) - {found.classes[t] for t in found.targets}
    labels = torch.tensor([classes.index(found.classes[t]) for t in found.targets])
    problems = [f"{folder / name}: no photos in the folder" for name in sorted(empty)]
    return [Path(p) for p, _ in found.samples], labels, problems


def predict(model, files: list[Path], transform, draft: int, args, device):
    """The indices of the readable photos and their softmax probabilities, computed in batches;
    the unreadable are named."""
    read, probabilities, problems = [], [], []
    batches = range(0, len(files), args.batch_size)
    for start in tqdm(batches, "predicting", disable=len(batches) < 2 or args.json):
        tensors = []
        for i in range(start, min(start + args.batch_size, len(files))):
            try:
                tensors.append(transform(utils.open_rgb(files[i], draft)))
                read.append(i)
            except (ValueError, OSError) as e:
                problems.append(f"{files[i]}: {e}")
        if tensors:
            batch = torch.stack(tensors).to(device, memory_format=torch.channels_last)
            with torch.no_grad():
                probabilities.append(torch.softmax(model(batch).float(), dim=1).cpu())
    probabilities = torch.cat(probabilities) if probabilities else torch.zeros(0, 1)
    return read, probabilities, problems


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Where in x the evidence for class target lies, as an x-sized map in [0, 1]: Grad-CAM
    (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) with the gradient taken at each
    position rather than averaged per channel (HiResCAM, https://arxiv.org/abs/2011.08891),
    which stays where the gradient is also in networks that flatten (LeNet, AlexNet, VGG)."""
    saved = {}

    def keep(module, inputs, output):
        saved["activations"] = output
        output.register_hook(lambda grad: saved.update(gradients=grad))

    with torch.enable_grad(), layer.register_forward_hook(keep):  # the hook goes at the end
        model(x.detach().clone().requires_grad_(True))[0, target].backward()
    model.zero_grad(set_to_none=True)  # the weights' gradients are not needed
    cam = (saved["gradients"].float() * saved["activations"].detach().float()).sum(1, keepdim=True)
    cam = nn.functional.interpolate(torch.relu(cam), size=x.shape[-2:], mode="bilinear")[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).cpu()


def draw_predictions(model, checkpoint, draft, device, files, probabilities, path, cam: bool):
    """The first MAX_GRID photos titled with their answers; with cam, as the network saw them,
    under a Grad-CAM map of the class it predicted (red: where the evidence for it lies most)."""
    from matplotlib import colormaps

    classes, files, pictures = checkpoint["classes"], files[:MAX_GRID], None
    note = f"\nGrad-CAM at {CAM_LAYER}" if cam else ""
    titles = [f"{classes[p.argmax()]} ({p.max():.0%}){note}" for p in probabilities[:MAX_GRID]]
    if cam:
        transform = val_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
        mean, std = (torch.tensor(checkpoint[key]).view(3, 1, 1) for key in ("mean", "std"))
        layer, pictures = model.get_submodule(CAM_LAYER), []
        for file, p in zip(files, probabilities, strict=False):
            x = transform(utils.open_rgb(file, draft)).unsqueeze(0)
            heat = grad_cam(model, layer, x.to(device), p.argmax())
            crop = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            pictures.append(0.5 * crop + 0.5 * colormaps["jet"](heat.numpy())[..., :3])  # <= 1
    shown = f"the first {MAX_GRID} of {len(probabilities)} photos"
    draw(files, titles, path, shown if len(probabilities) > MAX_GRID else "", pictures)


def draw_feature_maps(model, checkpoint, draft, device, file: Path, path: Path) -> None:
    """What the network makes of one photo: the photo as it sees it (the val crop) and its
    first convolution's filters (scaled together, so that their contrast compares), then for
    each stage of model.py's STAGES its output shape and the 8 channels that respond most."""
    transform = val_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    x, outputs = transform(utils.open_rgb(file, draft)).unsqueeze(0), {}

    def keep(name: str, module, inputs, output) -> None:  # a stage's output, as it passes
        outputs[name] = output[0].detach().float().cpu()

    with contextlib.ExitStack() as hooks, torch.no_grad():
        for n in STAGES[checkpoint["arch"]]:
            hooks.enter_context(model.get_submodule(n).register_forward_hook(partial(keep, n)))
        model(x.to(device, memory_format=torch.channels_last))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.detach().cpu()
    mean, std = (torch.tensor(checkpoint[key]).view(3, 1, 1) for key in ("mean", "std"))
    fig = Figure(figsize=(16, 2.6 * (len(outputs) + 1)), layout="constrained")
    top, *rows = fig.subfigures(len(outputs) + 1, 1)
    photo, tiles = top.subplots(1, 2)
    photo.imshow((x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
    photo.set_title(f"{file.name[:40]}, as the network sees it", fontsize=10)
    tiles.imshow(make_grid(first[:, :3].float(), 16, normalize=True, pad_value=1).permute(1, 2, 0))
    size = " x ".join(map(str, first.shape[-2:]))
    tiles.set_title(f"the first convolution's {len(first)} filters, {size}", fontsize=10)
    for row, (name, out) in zip(rows, outputs.items(), strict=True):
        shape = " x ".join(map(str, out.shape))
        row.suptitle(f"{name}: {shape}, the 8 channels that respond most", fontsize=10)
        strongest = out.mean((1, 2)).topk(min(8, len(out))).indices.tolist()
        for ax, c in zip(row.subplots(1, 8), strongest, strict=False):
            ax.imshow(out[c].numpy(), cmap="gray")
            ax.set_title(f"channel {c}", fontsize=8)
    for ax in fig.get_axes():
        ax.axis("off")
    utils.save_figure(fig, path)


def draw(files: list[Path], titles: list[str], path: Path, heading="", pictures=None) -> None:
    """The photos (or pictures made of them) in a grid of up to five columns, titled."""
    utils.use_fonts_for(titles)
    pictures = pictures or [ImageOps.contain(utils.open_rgb(f, 512), (512, 512)) for f in files]
    cols, scale = max(1, min(5, len(files))), 3 if len(files) > 1 else 5
    rows = max(1, math.ceil(len(files) / cols))
    lines = 2 + max([t.count("\n") for t in titles] or [0])  # each title, and the file's name
    height = (scale + 0.3 * lines) * rows + 0.3 * bool(heading)  # room for every title line
    fig = Figure(figsize=(scale * cols, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, picture, title in zip(axes.flat, files, pictures, titles, strict=False):
        ax.imshow(picture)
        ax.set_title(f"{title}\n{file.name[:28]}", fontsize=9 if len(files) > 1 else 12)
    fig.suptitle(heading)
    utils.save_figure(fig, path)


def score(files, labels, probabilities, classes: list[str], k: int) -> dict:
    """Accuracy, top-k accuracy, precision, recall and F1 per class, the confusion matrix (rows:
    the true class), the mistakes."""
    n, predicted = len(classes), probabilities.argmax(1)
    matrix = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    in_top_k = (probabilities.topk(k, dim=1).indices == labels[:, None]).any(1)
    scores = {"images": len(files), "accuracy": (predicted == labels).float().mean().item()}
    if 1 < k < n:  # top-1 is the accuracy, and the top n are always right
        scores |= {"k": k, "top_k_accuracy": in_top_k.float().mean().item()}
    right, guessed, truly = matrix.diag(), matrix.sum(0).clamp(min=1), matrix.sum(1).clamp(min=1)
    precision, recall = (right / guessed).tolist(), (right / truly).tolist()
    scores["per_class"] = {
        c: {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
        | {"images": n_c}
        for c, p, r, n_c in zip(classes, precision, recall, matrix.sum(1).tolist(), strict=True)
    }
    scores["confusion_matrix"], confidence = matrix.tolist(), probabilities.max(1).values
    wrong = sorted((predicted != labels).nonzero().flatten().tolist(), key=lambda j: -confidence[j])
    scores["misclassified"] = [
        {"file": str(files[j]), "true": classes[labels[j]], "predicted": classes[predicted[j]]}
        | {"probability": round(confidence[j].item(), 6)}
        for j in wrong
    ]
    return scores


def write_evaluation(scores: dict, classes: list[str], out: Path) -> list[Path]:
    """The confusion matrix and a gallery of the mistakes, most confident first, in out."""
    title = f"accuracy {scores['accuracy']:.3f} on {scores['images']} images"
    figure = utils.confusion_figure(torch.tensor(scores["confusion_matrix"]), classes, title)
    utils.save_figure(figure, out / "confusion_matrix.png")
    mistakes, files, titles = scores["misclassified"], [], []
    for m in mistakes[:MAX_GRID]:
        files.append(Path(m["file"]))
        titles.append(f"true: {m['true']}\npredicted: {m['predicted']} ({m['probability']:.0%})")
    heading = f"misclassified, most confident first: {len(files)} of {len(mistakes)}"
    draw(files, titles, out / "misclassified.png", heading)
    return [out / "confusion_matrix.png", out / "misclassified.png"]


def report(files, probabilities, classes: list[str], k: int, scores: dict | None, args) -> None:
    """Print each photo's top k, or with --eval the scores; as JSON with --json."""
    tops = [list(zip(*(t.tolist() for t in p.topk(k)), strict=True)) for p in probabilities]
    tops = [[{"class": classes[i], "probability": round(p, 6)} for p, i in top] for top in tops]
    if args.json:
        records = [{"file": str(file), "top": top} for file, top in zip(files, tops, strict=True)]
        print(json.dumps(scores if args.eval else records, indent=2))
    elif args.eval:
        top_k = f", top-{k} accuracy {scores['top_k_accuracy']:.4f}" if "k" in scores else ""
        print(
            f"{args.inputs[0]}: {scores['images']} images, accuracy {scores['accuracy']:.4f}{top_k}"
        )
        width = max(len(c) for c in classes)
        print(f"{'class':<{width}}  precision  recall     f1  images")
        for c, m in scores["per_class"].items():
            p, r, f1, n = m["precision"], m["recall"], m["f1"], m["images"]
            print(f"{c:<{width}}  {p:9.3f}  {r:6.3f}  {f1:5.3f}  {n:6d}")
        print(f"saved {', '.join(scores['outputs'])}")
    else:
        for file, top in zip(files, tops, strict=True):
            print(f"{file}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in top))


def read_checkpoint(args: argparse.Namespace, device: torch.device) -> tuple:
    """The network on device, the checkpoint --weights (or --arch) names, and its path."""
    weights = args.weights or FOLDER / "runs" / (args.arch or DEFAULT_ARCH) / "best.pth"
    weights = weights.expanduser().resolve()
    if not weights.is_file():
        found = [p.parent.name for p in sorted(FOLDER.glob("runs/*/best.pth"))]
        use = [
            f"--arch {a}" if a in ARCHS else f"--weights {FOLDER / 'runs' / a / 'best.pth'}"
            for a in found
        ]
        if use and not args.weights:
            raise UserError(f"no checkpoint at {weights}; trained here: {', '.join(use)}")
        train = f"python {FAMILY}/train.py" + (f" --arch {args.arch}" if args.arch else "")
        raise UserError(f"no checkpoint at {weights}: train one with `{train}`, or pass --weights")
    checkpoint = utils.load_checkpoint(weights, FAMILY)
    if args.arch not in (None, checkpoint["arch"]):
        raise UserError(f"{weights} holds {checkpoint['arch']}, not the --arch {args.arch}")
    try:
        model = build_model(checkpoint).to(device, memory_format=torch.channels_last).eval()
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{weights} does not fit {checkpoint['arch']}: {detail}") from e
    return model, checkpoint, weights


def check_save_path(save: Path, folder: bool) -> Path:
    """--save, checked before any work: a figure (in a folder: the default name), or a folder."""
    save, formats = save.expanduser().resolve(), Figure().canvas.get_supported_filetypes()
    formats.pop("pgf", None)  # needs LaTeX installed
    if folder and save.exists() and not save.is_dir():
        raise UserError(f"--save {save} is a file; with --eval it names a folder")
    if not folder and not save.is_dir() and save.suffix[1:].lower() not in ("", *formats):
        raise UserError(f"--save {save}: matplotlib cannot write {save.suffix} files; use .png")
    return save.with_suffix(".png") if not (folder or save.is_dir() or save.suffix) else save


def check_writable(out: Path, folder: bool, flag: str) -> None:
    """Before any photo is predicted: the folder out goes in (out itself for --eval), or the
    first of its parents that exists, takes a file (not a file in the way, not read-only)."""
    above = next(p for p in ([out] if folder else []) + list(out.parents) if os.path.lexists(p))
    try:
        tempfile.TemporaryFile(dir=above).close()
    except OSError as e:
        where = f"cannot write in {above} ({e.strerror or e})"
        raise UserError(f"{flag} {out}: {where}; pass --save with a place you can write") from e


def output_path(args: argparse.Namespace, save: Path | None, weights: Path, files: list[Path]):
    """What this run writes: --eval's folder, or the figure, named after the first photo."""
    if args.eval:
        return save or weights.parent / f"eval_{args.inputs[0].expanduser().resolve().name}"
    kind = "features" if args.feature_maps else "cam" if args.cam else "prediction"
    name = f"{kind}_{files[0].stem if files else ''}.png"
    return save / name if save and save.is_dir() else save or weights.parent / name


def main(args: argparse.Namespace) -> int:
    if args.eval and (len(args.inputs) != 1 or args.cam or args.feature_maps):
        raise UserError(
            "--eval takes one folder of class sub-folders, without --cam or --feature-maps"
        )
    save = args.save and check_save_path(args.save, folder=args.eval)
    device = utils.pick_device(args.device)
    model, checkpoint, weights = read_checkpoint(args, device)
    classes = checkpoint["classes"]
    transform = val_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    draft = 2 * round(checkpoint["image_size"] / 0.875)  # as train.py decodes its val photos
    k, scores = min(args.topk or max(1, min(5, len(classes) // 2)), len(classes)), None
    files, problems = ([], []) if args.eval else find_images(args.inputs)
    if args.feature_maps and (len(files) != 1 or args.cam):
        raise UserError(f"--feature-maps draws one photo, without --cam: {len(files)} photos given")
    out = output_path(args, save, weights, files)  # what this run writes, apart from what it reads
    flag = "--save" if save else "the default output"
    utils.check_apart(out, flag, [*args.inputs, weights])
    check_writable(out, args.eval, flag)
    if args.eval:
        files, labels, problems = labelled_images(args.inputs[0].expanduser(), classes)
    kept, probs, unreadable = predict(model, files, transform, draft, args, device)
    read = [files[i] for i in kept]
    for problem in problems + unreadable:
        print(f"{FAMILY}/predict.py: error: {problem}", file=sys.stderr)
    if args.eval and not read:
        raise UserError(f"no photo of {args.inputs[0]} could be read")
    if args.eval:
        scores = score(read, labels[kept], probs, classes, k)
        scores["outputs"] = [str(path) for path in write_evaluation(scores, classes, out)]
    report(read, probs, classes, k, scores, args)
    if read and not args.eval and (save or args.cam or args.feature_maps or not args.json):
        if args.feature_maps:
            draw_feature_maps(model, checkpoint, draft, device, read[0], out)
        else:
            draw_predictions(model, checkpoint, draft, device, read, probs, out, args.cam)
        if not args.json:
            print(f"figure saved to {out}")
    return 1 if problems or unreadable else 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__doc__, f"{FAMILY}/predict.py")
    add, path = parser.add_argument, utils.user_path
    add("inputs", nargs="+", type=path, metavar="PHOTO_OR_FOLDER", help="photos, folders of photos")
    add("--weights", type=path, help="a checkpoint of train.py (default: runs/<arch>/best.pth)")
    add_model_args(parser)
    add("--topk", type=utils.number(int, 1), help="classes per photo (default: 5, half at most)")
    add("--json", action="store_true", help="print the results as JSON, nothing else")
    saved = "the figure, or --eval's folder (default: beside the checkpoint; none with --json)"
    add("--save", type=path, metavar="PATH", help=saved)
    add("--eval", action="store_true", help="score a folder of class folders: accuracy, mistakes")
    add("--cam", action="store_true", help="draw where the network looks (Grad-CAM)")
    add("--feature-maps", action="store_true", help="one photo: first filters, each stage's output")
    add("-b", "--batch-size", type=utils.number(int, 1), default=32, help="photos per forward pass")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


if __name__ == "__main__":
    utils.run_command(main, get_args_parser())
