"""Predict the class of photos with the GoogLeNet that googlenet/train.py trained.

    $ python googlenet/predict.py photo.jpg
    $ python googlenet/predict.py photos/ more.png --topk 3
    $ python googlenet/predict.py photos/ --json > predictions.json
    $ python googlenet/predict.py photo.jpg --cam      # where the network looks
    $ python googlenet/predict.py data/flower_data/val --eval # accuracy, per class, mistakes

The checkpoint holds all the network needs (architecture, classes, image size, mean and std),
and photos go through train.py's validation preprocessing. Unreadable files are named on
stderr and the rest still predicted; the exit code is then 1. See docs/prediction.md.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): stop, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import csv
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torchvision.datasets import ImageFolder
from tqdm import tqdm

import utils
from model import GoogLeNet, without_aux
from train import val_transform
from utils import UserError

FOLDER = Path(__file__).resolve().parent
FAMILY = "googlenet"
DEFAULT_ARCH = "googlenet"
# Grad-CAM looks at the last Inception block: 7 x 7 at 224 pixels
CAM_LAYER = "inception5b"
MAX_GRID = 25  # photos drawn in a figure


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(arch=None)


def build_model(checkpoint: dict) -> nn.Module:
    """The inference network: no auxiliary heads, so exactly their weights are dropped."""
    model = GoogLeNet(num_classes=len(checkpoint["classes"]), aux_logits=False, init_weights=False)
    model.load_state_dict(without_aux(checkpoint["model"]))  # strict: the rest must fit
    return model


def find_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """The photos named, or found in folders (recursively, sorted, hidden ones skipped)."""
    files, problems = [], []
    for path in inputs:
        if path.is_file():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and utils.is_photo(p))
        found = [p for p in found if "/." not in f"/{p.relative_to(path).as_posix()}"]
        files += found
        problems += [] if found else [f"{path}: no such file, or no photos in the folder"]
    return files, problems


def labelled_images(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor, list]:
    """The photos of folder/<class>/, as train.py --test-only finds them, and their labels."""
    try:
        found = ImageFolder(folder, is_valid_file=utils.is_photo, allow_empty=True)
    except OSError:  # not a folder, or no class folders in it
        found = None
    unknown = sorted(set(found.classes) - set(classes)) if found else []
    if not found or not found.classes or unknown:
        raise UserError(
            f"--eval {folder}: {', '.join(unknown) or 'no class sub-folders'}: not "
            f"a class of the checkpoint ({', '.join(classes)}); pass a folder of class sub-folders"
        )
    empty = set(found.classes) - {found.classes[t] for t in found.targets}
    labels = torch.tensor([classes.index(found.classes[t]) for t in found.targets])
    problems = [f"{folder / name}: no photos in the folder" for name in sorted(empty)]
    return [Path(p) for p, _ in found.samples], labels, problems


def predict(model, files: list[Path], transform, draft: int, args, device):
    """The softmax probabilities of each readable photo, in batches, and a small picture of
    the first MAX_GRID for the figure; the unreadable photos are named, not predicted."""
    read, probabilities, pictures, problems = [], [], [], []
    batches = range(0, len(files), args.batch_size)
    for start in tqdm(batches, "predicting", disable=len(batches) < 2 or args.json):
        tensors = []
        for file in files[start : start + args.batch_size]:
            try:
                picture = utils.open_rgb(file, draft)
            except (ValueError, OSError) as e:
                problems.append(f"{file}: {e}")
                continue
            read.append(file)
            tensors.append(transform(picture))
            if len(pictures) < MAX_GRID:
                picture.thumbnail((512, 512))
                pictures.append(picture)
        if tensors:
            batch = torch.stack(tensors).to(device, memory_format=torch.channels_last)
            with torch.no_grad():
                probabilities.append(torch.softmax(model(batch).float(), dim=1).cpu())
    probabilities = torch.cat(probabilities) if probabilities else torch.zeros(0, 1)
    return read, probabilities, pictures, problems


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Where in x the evidence for class target lies, as an x-sized map in [0, 1]: Grad-CAM
    (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) with the gradient taken at each
    position rather than averaged per channel (HiResCAM, https://arxiv.org/abs/2011.08891),
    which stays where the gradient is also in networks that flatten (LeNet, AlexNet, VGG)."""
    saved = {}

    def keep(module, inputs, output):
        saved["activations"] = output
        output.register_hook(lambda grad: saved.update(gradients=grad))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            model(x.detach().clone().requires_grad_(True))[0, target].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)  # the weights' gradients are not needed
    cam = (saved["gradients"].float() * saved["activations"].detach().float()).sum(1, keepdim=True)
    cam = F.interpolate(torch.relu(cam), size=x.shape[-2:], mode="bilinear")[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).cpu()


def cam_pictures(model, files, probabilities, target, checkpoint, draft, device) -> list:
    """Grad-CAM over the first MAX_GRID photos as the network saw them (red: where the
    evidence for the predicted class, or target, lies most)."""
    from matplotlib import colormaps

    transform = val_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    mean, std = (torch.tensor(checkpoint[key]).view(3, 1, 1) for key in ("mean", "std"))
    layer, pictures = model.get_submodule(CAM_LAYER), []
    for file, p in zip(files[:MAX_GRID], probabilities, strict=False):
        x = transform(utils.open_rgb(file, draft)).unsqueeze(0)
        index = p.argmax().item() if target is None else checkpoint["classes"].index(target)
        heat = grad_cam(model, layer, x.to(device, memory_format=torch.channels_last), index)
        crop = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        pictures.append(0.55 * crop + 0.45 * colormaps["jet"](heat.numpy())[..., :3])
    return pictures


def draw(files, probabilities, pictures, classes, k: int, path: Path, show: bool, note="") -> None:
    """One photo: the photo and a bar chart of its top k. Several: a grid of titled photos."""
    import matplotlib.pyplot as plt  # here, so that --json runs never load a GUI toolkit

    utils.use_fonts_for(classes)
    if len(files) == 1:
        fig, (ax_photo, ax_bars) = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
        top = probabilities[0].topk(k)
        names = [classes[i] for i in top.indices.tolist()]
        ax_photo.imshow(pictures[0])
        ax_photo.set_title(f"{names[0]} ({top.values[0]:.1%}){note}")
        ax_photo.axis("off")
        ax_bars.barh(names[::-1], top.values.flip(0).tolist(), color="tab:blue")
        ax_bars.set(xlim=(0, 1), xlabel="probability", title=files[0].name)
    else:
        cols = min(5, len(pictures))
        rows = math.ceil(len(pictures) / cols)
        size = (3 * cols, 3.3 * rows)
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for ax, file, p, picture in zip(axes.flat, files, probabilities, pictures, strict=False):
            ax.imshow(picture)
            name = classes[p.argmax()]
            ax.set_title(f"{name} ({p.max():.0%}){note}\n{file.name[:28]}", fontsize=9)
        if len(files) > len(pictures):
            fig.suptitle(f"the first {len(pictures)} of {len(files)} photos")
    utils.save_figure(fig, path)
    if show and plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        plt.show()
    plt.close(fig)


def score(files, labels, probabilities, classes: list[str], k: int) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1, confusion matrix, mistakes."""
    n, predicted = len(classes), probabilities.argmax(1)
    matrix = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    hits, support, called = matrix.diag().double(), matrix.sum(1), matrix.sum(0)
    precision, recall = hits / called.clamp(min=1), hits / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    per_class = {}
    for i, name in enumerate(classes):
        per_class[name] = {"precision": precision[i].item(), "recall": recall[i].item()}
        per_class[name] |= {"f1": f1[i].item(), "support": support[i].item()}
    wrong = (predicted != labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda j: -probabilities[j].max())  # the most confident first
    mistakes = [[str(files[j]), classes[labels[j]], classes[predicted[j]]] for j in wrong]
    mistakes = [dict(zip(["file", "true", "predicted"], m, strict=True)) for m in mistakes]
    for j, mistake in zip(wrong, mistakes, strict=True):
        mistake["probability"] = round(probabilities[j].max().item(), 6)
    in_top_k = (probabilities.topk(k, dim=1).indices == labels[:, None]).any(1)
    scores = {"images": len(files), "accuracy": (predicted == labels).float().mean().item()}
    scores |= {"k": k, "top_k_accuracy": in_top_k.float().mean().item(), "classes": per_class}
    return scores | {"confusion_matrix": matrix.tolist(), "misclassified": mistakes}


def write_evaluation(scores: dict, classes: list[str], draft: int, out: Path) -> list[Path]:
    """The confusion matrix (PNG and CSV) and a gallery of the mistakes, in out."""
    matrix = torch.tensor(scores["confusion_matrix"])
    title = f"accuracy {scores['accuracy']:.3f} on {scores['images']} images"
    paths = [out / "confusion_matrix.png", out / "confusion_matrix.csv", out / "misclassified.png"]
    utils.save_figure(utils.confusion_figure(matrix, classes, title), paths[0])
    table = io.StringIO()
    rows = [[name, *row] for name, row in zip(classes, matrix.tolist(), strict=True)]
    csv.writer(table).writerows([["true \\ predicted", *classes], *rows])  # names quoted as needed
    utils.write_file(paths[1], lambda f: f.write(table.getvalue().encode()))
    mistakes = scores["misclassified"][:MAX_GRID]
    cols, rows = max(1, min(5, len(mistakes))), max(1, math.ceil(len(mistakes) / 5))
    fig = Figure(figsize=(3 * cols, 3.4 * rows), layout="constrained")
    for ax in fig.subplots(rows, cols, squeeze=False).flat:
        ax.axis("off")
    for ax, m in zip(fig.axes, mistakes, strict=False):
        ax.imshow(utils.open_rgb(Path(m["file"]), draft))
        title = f"true: {m['true']}\npredicted: {m['predicted']} ({m['probability']:.0%})"
        ax.set_title(f"{title}\n{Path(m['file']).name[:28]}", fontsize=9)
    if not mistakes:
        fig.axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    total = len(scores["misclassified"])
    fig.suptitle(f"misclassified, most confident first: {len(mistakes)} of {total} shown")
    utils.save_figure(fig, paths[2])
    return paths


def report(files, probabilities, classes: list[str], k: int, scores: dict | None, args) -> None:
    """Print each photo's top k, or with --eval the scores; as JSON with --json."""
    tops = [list(zip(*(t.tolist() for t in p.topk(k)), strict=True)) for p in probabilities]
    tops = [[{"class": classes[i], "probability": round(p, 6)} for p, i in top] for top in tops]
    if args.json:
        records = [{"file": str(file), "top": top} for file, top in zip(files, tops, strict=True)]
        print(json.dumps(scores if args.eval else records, indent=2))
    elif args.eval:
        print(
            f"{args.inputs[0]}: {scores['images']} images, accuracy {scores['accuracy']:.4f}, "
            f"top-{k} accuracy {scores['top_k_accuracy']:.4f}"
        )
        width = max(len(name) for name in classes) + 2
        print(f"{'class':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
        for name, c in scores["classes"].items():
            values = f"{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>8.3f}{c['support']:>9}"
            print(f"{name:<{width}}{values}")
    else:
        for file, top in zip(files, tops, strict=True):
            print(f"{file}: {top[0]['class']} {top[0]['probability']:.3f}")
            for rank, entry in enumerate(top, 1):
                print(f"  {rank}. {entry['class']:<20} {entry['probability']:.3f}")


def read_checkpoint(args: argparse.Namespace, device: torch.device) -> tuple:
    """The network on device, the checkpoint --weights (or --arch) names, and its path."""
    weights = args.weights or FOLDER / "runs" / (args.arch or DEFAULT_ARCH) / "best.pth"
    weights = weights.expanduser().resolve()
    arch = f" --arch {args.arch}" if args.arch not in (None, DEFAULT_ARCH) else ""
    if not weights.is_file():
        command = f"python {FAMILY}/train.py{arch}"
        raise UserError(
            f"no checkpoint at {weights}: train one with `{command}`, or pass --weights"
        )
    checkpoint = utils.load_checkpoint(weights, FAMILY)
    if args.arch not in (None, checkpoint["arch"]):
        raise UserError(
            f"{weights} holds {checkpoint['arch']}, not the --arch {args.arch} asked for"
        )
    if args.cam_class not in (None, *checkpoint["classes"]):
        raise UserError(f"--cam-class {args.cam_class}: not one of {checkpoint['classes']}")
    try:
        model = build_model(checkpoint).to(device, memory_format=torch.channels_last).eval()
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{weights} does not fit {checkpoint['arch']}: {detail}") from e
    return model, checkpoint, weights


def check_save_path(save: Path | None, folder: bool) -> Path | None:
    """--save as a figure to write (a folder gets the default name, a bare name .png), or with
    folder (--eval) as the folder for the outputs; checked before any work."""
    if save is None:
        return None
    save, formats = save.expanduser().resolve(), Figure().canvas.get_supported_filetypes()
    if folder and save.exists() and not save.is_dir():
        raise UserError(f"--save {save} is a file; with --eval it names a folder")
    if not folder and not save.is_dir() and save.suffix[1:].lower() not in ("", *formats):
        known = ", ".join("." + f for f in sorted(formats))
        raise UserError(f"--save {save}: matplotlib cannot write {save.suffix} files; use {known}")
    folders = (save, *save.parents) if save.is_dir() else save.parents  # the files go in
    above = next(p for p in folders if p.exists())  # the first of these that exists
    try:  # a file in the way, a read-only folder: before any photo is predicted
        tempfile.TemporaryFile(dir=above).close()
    except OSError as e:
        raise UserError(f"--save {save}: cannot write in {above} ({e.strerror or e})") from e
    return save.with_suffix(".png") if not (folder or save.is_dir() or save.suffix) else save


def main(args: argparse.Namespace) -> int:
    if args.eval and (len(args.inputs) != 1 or args.cam or args.cam_class):
        raise UserError("--eval takes one folder of class sub-folders, without --cam")
    save = check_save_path(args.save, folder=args.eval)
    device = utils.pick_device(args.device)
    model, checkpoint, weights = read_checkpoint(args, device)
    default = f"eval_{args.inputs[0].expanduser().resolve().name}" if args.eval else ""
    out = save or weights.parent / default  # what this run writes, apart from what it reads:
    written = out / "figure.png" if out.is_dir() and not args.eval else out
    utils.check_apart(written, "--save" if save else "the default output", [*args.inputs, weights])
    classes = checkpoint["classes"]
    transform = val_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    draft = 2 * round(checkpoint["image_size"] / 0.875)  # as train.py decodes its val photos
    k, scores = min(args.topk, len(classes)), None
    if args.eval:
        files, labels, problems = labelled_images(args.inputs[0].expanduser(), classes)
    else:
        files, problems = find_images(args.inputs)
    read, probs, pictures, unreadable = predict(model, files, transform, draft, args, device)
    for problem in problems + unreadable:
        print(f"{FAMILY}/predict.py: error: {problem}", file=sys.stderr)
    if args.eval and not read:
        raise UserError(f"no photo of {args.inputs[0]} could be read")
    if args.eval:
        scores = score(read, labels[[files.index(f) for f in read]], probs, classes, k)
        scores["outputs"] = [str(path) for path in write_evaluation(scores, classes, draft, out)]
    report(read, probs, classes, k, scores, args)
    if scores and not args.json:
        print(f"saved {', '.join(Path(path).name for path in scores['outputs'])} in {out}")
    if read and not args.eval and (save or args.cam or args.cam_class or not args.json):
        cam, name = args.cam or args.cam_class, f"prediction_{read[0].stem}.png"
        if cam:
            pictures = cam_pictures(model, read, probs, args.cam_class, checkpoint, draft, device)
            name = f"cam_{read[0].stem}.png"
        figure = save / name if save and save.is_dir() else save or weights.parent / name
        note = f"\nGrad-CAM at {CAM_LAYER}" if cam else ""
        draw(read, probs, pictures, classes, k, figure, not (args.no_show or args.json), note)
        if not args.json:
            print(f"Grad-CAM at layer {CAM_LAYER}; " if cam else "", end="")
            print(f"figure saved to {figure}")
    return 1 if problems or unreadable else 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__doc__, f"{FAMILY}/predict.py")
    add = parser.add_argument
    add("inputs", nargs="+", type=Path, metavar="PHOTO_OR_FOLDER", help="photos, folders of photos")
    add("--weights", type=Path, help="a checkpoint of train.py (default: runs/<arch>/best.pth)")
    add_model_args(parser)
    add("--topk", type=utils.number(int, 1), default=5, help="classes listed per photo")
    add("--json", action="store_true", help="print the results as JSON, nothing else")
    add("--save", type=Path, metavar="PATH", help="the figure, or --eval's folder (default: no)")
    add("--no-show", action="store_true", help="never open a window (else: where a display is)")
    add("--eval", action="store_true", help="score a folder of class folders: accuracy, mistakes")
    add("--cam", action="store_true", help="draw where the network looks (Grad-CAM)")
    add("--cam-class", metavar="NAME", help="with --cam: this class (default: the predicted)")
    add("-b", "--batch-size", type=utils.number(int, 1), default=32, help="photos per forward pass")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


if __name__ == "__main__":
    utils.run_command(main, get_args_parser())
