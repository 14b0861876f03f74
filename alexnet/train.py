"""Train AlexNet on the flower split, or on any train/ + val/ ImageFolder split.

    $ python alexnet/train.py                             # 30 epochs from scratch
    $ python alexnet/train.py --device cpu --epochs 3 --batch-size 32
    $ python alexnet/train.py --resume                    # continue runs/alexnet/last.pth

AdamW with one epoch of linear warm-up, then cosine decay; weight decay 0.05. Outputs go to
alexnet/runs/alexnet/: best.pth, last.pth, metrics.csv and curves.png (predict.py --eval scores).
docs/training.md explains every flag; utils.py holds the plumbing.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): stop, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2 as T
from tqdm import tqdm

import utils
from model import AlexNet
from utils import Run, UserError

FOLDER = Path(__file__).resolve().parent
FAMILY = "alexnet"
DEFAULTS = {"arch": "alexnet", "batch_size": 64, "lr": 3e-4, "image_size": 224}
# ImageNet's mean and std: what torchvision's pretrained weights expect, and fine from scratch.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# A first run of minutes on a CPU: train.py suggests it when a run would take over 15 minutes.
QUICKER = {"--image-size": "64"}


# This folder's own part: the network and its loss


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(arch=DEFAULTS["arch"])


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    return AlexNet(num_classes=num_classes)


def compute_loss(output: torch.Tensor, targets: torch.Tensor, criterion: nn.Module):
    """The loss to train on and the logits to score."""
    return criterion(output, targets), output


# Data


def build_transforms(image_size: int, augment: str, crop_scale: float):
    """Training augmentation (each crop covers crop_scale of the photo's area to all of it)
    and the validation preprocessing, which predict.py uses too."""
    strong = augment == "trivialaugment"
    train = [T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)), T.RandomHorizontalFlip()]
    train += [T.TrivialAugmentWide()] if strong else []
    train += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]
    train += [T.RandomErasing(0.25)] if strong else []
    return T.Compose(train), val_transform(image_size, MEAN, STD)


def val_transform(image_size: int, mean: list[float], std: list[float]) -> T.Compose:
    """The shorter side to image_size / 0.875 (256 for 224, as on ImageNet), the centre crop."""
    steps = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToImage()]
    return T.Compose([*steps, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def load_datasets(args: argparse.Namespace, run: Run, workers: int):
    """The ImageFolders train/ and val/ of --data-path, with the same classes (--cache: in RAM)."""
    train_tf, val_tf = build_transforms(args.image_size, args.augment, args.crop_scale)
    root = args.data_path.expanduser().resolve()
    # JPEGs are decoded at no less than twice the size the transforms need.
    train_set = utils.image_folder(root / "train", train_tf, 2 * args.image_size)
    val_set = utils.image_folder(root / "val", val_tf, 2 * round(args.image_size / 0.875))
    if train_set.classes != val_set.classes or len(train_set.classes) < 2:
        found = f"{train_set.classes} vs {val_set.classes}"
        raise UserError(f"{root}: train/ and val/ need the same two or more classes ({found})")
    utils.check_split(root, train_set, val_set)
    cached = utils.cache(train_set, val_set, args.cache, args.image_size, workers, run)
    return *cached, train_set.classes


def build_loaders(train_set, val_set, args: argparse.Namespace, run: Run, workers: int):
    """This process's loaders, and the sampler to tell the epoch: a shuffle seeded by (seed,
    epoch), augmentation seeded per photo, so a resumed run sees the batches it would have."""
    kwargs = {"batch_size": args.batch_size, "num_workers": workers}
    kwargs |= {"pin_memory": run.device.type == "cuda", "persistent_workers": workers > 0}
    sampler = utils.EpochSampler(train_set, run.world_size, run.rank, seed=args.seed)
    one_left = len(sampler) % args.batch_size == 1  # batch norm cannot train on one image
    train_loader = DataLoader(
        utils.SeededSamples(train_set, args.seed), sampler=sampler, drop_last=one_left, **kwargs
    )
    val_shard = Subset(val_set, range(run.rank, len(val_set), run.world_size))
    return sampler, train_loader, DataLoader(val_shard, **kwargs)


# Optimizer and schedule


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW (fused: all tensors in one pass); no weight decay on biases and norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


def make_scheduler(optimizer, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """One epoch of linear warm-up (a fifth of the run at most), then cosine decay to zero."""
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(steps_per_epoch, total_steps // 5)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def steps_per_epoch(batches: int, args: argparse.Namespace) -> int:
    """Optimizer steps per epoch: one per --accum-steps batches (one with --dry-run)."""
    if batches < args.accum_steps and not args.dry_run:
        found = f"{batches} batches of --batch-size {args.batch_size}"
        raise UserError(f"--accum-steps {args.accum_steps}: an epoch has {found}; lower one")
    return 1 if args.dry_run else -(-batches // args.accum_steps)


# Training and evaluation


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, epoch, args, run):
    """One pass over this process's training batches: loss, accuracy, speed, data wait.

    With --accum-steps N the gradients of N batches add up before each optimizer step; each
    batch's loss counts by its share of the step's images, so the step is the mean over them,
    as one large batch would have it.
    """
    set_train_mode(model)
    batches = min(args.accum_steps, len(loader)) if args.dry_run else len(loader)
    steps = accumulation(len(loader.sampler), args.batch_size, batches, args.accum_steps)
    meter = utils.EpochMeter(epoch, args.epochs, batches, run, QUICKER)  # bar, sums, clock
    # zip stops after the last step (--dry-run takes fewer batches than the loader has).
    for (share, ends_step), (images, targets) in meter.wrap(zip(steps, loader, strict=False)):
        # 1. The batch to the device (channels_last: the memory layout fast convolutions use).
        images = images.to(run.device, non_blocking=True, memory_format=torch.channels_last)
        targets = targets.to(run.device, non_blocking=True)
        with utils.averaging_gradients(model, run, now=ends_step):  # DDP: once per step
            # 2. Forward and loss, in the precision autocast picks per operation.
            with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
                loss, logits = compute_loss(model(images), targets, criterion)
            # 3. Backward: the gradient of the loss for every weight (added to what is there).
            scaler.scale(loss * share).backward()
        # 4. The optimizer step moves every weight against its gradient; then the next lr.
        if ends_step:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        meter.add(loss, logits, targets)
    return meter.row(args.lr)


def set_train_mode(model: nn.Module) -> None:
    """Training mode, but a frozen layer (--freeze-backbone) keeps its batch-norm statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            module.train(module.weight.requires_grad)


def accumulation(images: int, batch_size: int, batches: int, accum: int) -> list[tuple]:
    """For each batch: its share of its optimizer step's images, and whether it ends the step
    (every accum-th batch, and the last)."""
    sizes = [min(batch_size, images - i * batch_size) for i in range(batches)]
    steps = [sum(sizes[first : first + accum]) for first in range(0, batches, accum)]
    return [
        (size / steps[i // accum], (i + 1) % accum == 0 or i + 1 == batches)
        for i, size in enumerate(sizes)
    ]


@torch.no_grad()
def evaluate(model, criterion, loader, args, run) -> dict:
    """Loss and accuracy of the main head on every val image: each process takes every
    world_size-th image (maybe none), and the sums are added up over the processes."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # images, loss x images, correct
    for images, targets in tqdm(loader, "val", leave=False, disable=not run.is_main):
        images = images.to(run.device, non_blocking=True, memory_format=torch.channels_last)
        targets = targets.to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            logits = model(images)
        sums[0] += targets.size(0)
        sums[1] += criterion(logits.float(), targets).double() * targets.size(0)
        sums[2] += (logits.argmax(1) == targets).sum()
        if args.dry_run:
            break
    if run.distributed:
        dist.all_reduce(sums)
    seen, loss_sum, correct = sums.tolist()
    return {"loss": loss_sum / seen, "acc": correct / seen}


def prepare_outputs(args: argparse.Namespace, run: Run):
    """The output folder (checked for writing); the checkpoint --resume names (None for a new
    run) with args taking its recipe: a different flag given now is named and ignored, but for
    --batch-size and --accum-steps with their product kept (as the out-of-memory advice has)."""
    output_dir = output_dir_of(args)
    utils.check_apart(output_dir, "--output-dir", [args.data_path])
    if run.is_main:
        utils.prepare_output_dir(output_dir)
    if args.resume is None:
        if (last := output_dir / "last.pth").exists():
            what = "of an earlier run: continue it with --resume, or start a new run elsewhere"
            what = what if last.is_file() else "(a folder): move it away, or start elsewhere"
            raise UserError(f"{output_dir} holds last.pth {what} with --output-dir DIR")
        return args, output_dir, None
    path = output_dir / "last.pth" if args.resume == "last" else Path(args.resume)
    checkpoint = utils.load_checkpoint(path.expanduser(), FAMILY)
    names = ["lr", "weight_decay", "label_smoothing", "augment", "crop_scale", "image_size", "seed"]
    kinds = {"optimizer": dict, "scheduler": dict, "scaler": dict, "args": dict, "history": list}
    recipe, history = checkpoint.get("args"), checkpoint.get("history")
    state = [type(checkpoint.get(key)) is kind for key, kind in kinds.items()]
    if not all(state) or not {*names, "batch_size", "accum_steps"} <= set(recipe):
        raise UserError(f"{path} holds no training state of train.py (resume from a last.pth)")
    row = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}  # what the plots read
    if checkpoint.get("epoch") != len(history) or not all(row <= r.keys() for r in history):
        raise UserError(f"{path}: its epoch and history disagree; resume from a last.pth")
    if args.epochs <= checkpoint["epoch"]:
        raise UserError(f"{path} already trained {checkpoint['epoch']} epochs: pass more --epochs")
    parser = get_args_parser()
    if args.batch_size * args.accum_steps != recipe["batch_size"] * recipe["accum_steps"]:
        names += ["batch_size", "accum_steps"]  # the same step split otherwise is kept
    changes = {n: recipe[n] for n in names if recipe[n] != getattr(args, n)}
    for name, saved in changes.items():
        if run.is_main and getattr(args, name) != parser.get_default(name):
            flag = f"--{name.replace('_', '-')} {getattr(args, name)}"
            print(f"note: {flag} is ignored: the resumed run keeps the checkpoint's {saved}")
    return argparse.Namespace(**{**vars(args), **changes}), output_dir, {**checkpoint, "path": path}


# Checkpoints and resuming


def restore(resumed, args, classes, model, optimizer, scheduler, scaler, run) -> list:
    """Put a checkpoint's training state back; return its history (one row per epoch)."""
    if resumed is None:
        return []
    if resumed["arch"] != args.arch or resumed["classes"] != classes:
        found = f"{resumed['arch']} for the classes {resumed['classes']}"
        raise UserError(f"{resumed['path']} holds {found}, not {args.arch} for {classes}")
    try:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed["scaler"]:  # empty when the run was bf16 or fp32: a new fp16 scaler starts
            scaler.load_state_dict(resumed["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{resumed['path']}: its training state does not fit ({detail})") from e
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # for a new --epochs
    if run.is_main:
        print(f"resumed from {resumed['path']} at epoch {resumed['epoch']}")
    return resumed["history"]


def save_epoch(model, optimizer, scheduler, scaler, history, classes, args, output_dir) -> None:
    """The epoch's line, metrics.csv and curves.png; best.pth (what predict.py reads) and
    last.pth, which adds the training state that --resume continues from. No random state:
    data order, augmentation and dropout are seeded per epoch and image."""
    epoch = history[-1]["epoch"]
    options = {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)}
    best = {"family": FAMILY, "arch": args.arch, "model": model.state_dict(), "epoch": epoch}
    best |= {"classes": classes, "image_size": args.image_size, "mean": MEAN, "std": STD}
    best["args"] = {**vars(args), **options}  # plain values only, as torch.load(weights_only) reads
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    training |= {"scaler": scaler.state_dict(), "history": history}
    utils.log_epoch(history, args.epochs, output_dir)
    utils.write_file(output_dir / "best.pth", partial(torch.save, best))
    utils.write_file(output_dir / "last.pth", partial(torch.save, {**best, **training}))


def output_dir_of(args: argparse.Namespace) -> Path:
    return (args.output_dir or FOLDER / "runs" / args.arch).expanduser().resolve()


def out_of_memory_message(args: argparse.Namespace) -> str:
    """Half the batch and twice --accum-steps: the same optimizer step with half the
    activations, continuing from last.pth if the run saved one. The weights, their gradients
    and AdamW's state do not shrink with the batch (most of what VGG16 holds)."""
    problem = f"CUDA ran out of memory at --batch-size {args.batch_size}"
    amp = "; --amp bf16 or fp16 also halves the activations" if args.amp == "off" else ""
    if args.batch_size < 4:  # half of it would leave batch norm fewer than 2 images
        return f"{problem}; try a smaller --image-size{amp}"
    changes = {
        "--batch-size": str(args.batch_size // 2),
        "--accum-steps": str(2 * args.accum_steps),
    }
    last = output_dir_of(args) / "last.pth"
    changes |= {"--resume": str(last)} if last.is_file() else {}
    what = "continue" if last.is_file() else "the same training"
    advice = f"{what} with half the activations: {utils.command_with(changes)}{amp}"
    return f"{problem} (weights, gradients and AdamW's state do not shrink with it); {advice}"


def main(args: argparse.Namespace) -> None:
    run = utils.start_run(args.device, args.amp)
    args, output_dir, resumed = prepare_outputs(args, run)
    torch.manual_seed(args.seed)
    workers = utils.loader_workers(args.workers, run)
    train_set, val_set, classes = load_datasets(args, run, workers)
    sampler, train_loader, val_loader = build_loaders(train_set, val_set, args, run, workers)
    model = build_model(args, len(classes)).to(run.device, memory_format=torch.channels_last)
    utils.check_image_size(model, args.image_size, args.arch, run.device, args.batch_size)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if run.is_main:
        images = f"{len(train_set)} train / {len(val_set)} val images, {len(classes)} classes"
        print(f"{args.arch} on {run}, {workers} workers, batch {args.batch_size}: {images}")
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, steps_per_epoch(len(train_loader), args), args.epochs)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == torch.float16)
    history = restore(resumed, args, classes, model, optimizer, scheduler, scaler, run)
    train_model = utils.distribute(model, run, args.sync_bn, args.compile)
    started, epoch, saved = time.perf_counter(), len(history), len(history)
    try:
        for epoch in range(len(history) + 1, args.epochs + 1):
            sampler.set_epoch(epoch)
            torch.manual_seed(utils.seed_for(args.seed, run.rank, epoch))  # dropout's draws
            row = train_one_epoch(
                train_model, criterion, optimizer, scheduler, scaler, train_loader, epoch, args, run
            )
            utils.share_buffers(model, run)  # rank 0's batch-norm statistics, which best.pth keeps
            val = evaluate(model, criterion, val_loader, args, run)
            row |= {"val_loss": val["loss"], "val_acc": val["acc"]}
            history.append({"epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]})
            if run.is_main:
                save_epoch(model, optimizer, scheduler, scaler, history, classes, args, output_dir)
            saved = epoch
    except KeyboardInterrupt:
        stopped = f"\ninterrupted in epoch {epoch}; {utils.kept(saved, output_dir)}"
        utils.exit_interrupted(stopped if run.is_main else "")
    except UserError as e:  # an unreadable photo, a full disk: say what is saved
        raise UserError(f"{str(e).rstrip()}; {utils.kept(saved, output_dir)}") from e
    if run.is_main:
        utils.report_end(history, args.epochs, time.perf_counter() - started, output_dir)


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__doc__, f"{FAMILY}/train.py")
    add, num, path, d = parser.add_argument, utils.number, utils.user_path, DEFAULTS
    add("--data-path", type=path, default=FOLDER.parent / "data/flower_data", help="train/ + val/")
    add("--image-size", type=num(int, 1), default=d["image_size"], help="crop size in pixels")
    add("--cache", choices=["auto", "on", "off"], default="auto", help="decoded images in RAM")
    add("-j", "--workers", type=num(int, 0), help="loader processes (default: CPUs, max 8)")
    add("--epochs", type=num(int, 1), default=30, help="epochs to train")
    add("-b", "--batch-size", type=num(int, 1), default=d["batch_size"], help="images per batch")
    add("--accum-steps", type=num(int, 1), default=1, help="batches per optimizer step")
    add("--lr", type=num(float, 0, low_in=False), default=d["lr"], help="peak AdamW learning rate")
    add("--weight-decay", "--wd", type=num(float, 0), default=0.05, help="AdamW weight decay")
    add("--label-smoothing", type=num(float, 0, 1, high_in=False), default=0.0, help="0 to <1")
    add("--augment", choices=["crop-flip", "trivialaugment"], default="crop-flip", help="training")
    add("--crop-scale", type=num(float, 0, 1, low_in=False), default=0.08, help="least crop area")
    add("--seed", type=num(int, 0, 2**63 - 1), default=0, help="random seed")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto", help="mixed precision")
    add("--output-dir", type=path, help="checkpoints, metrics and plots (default: runs/<arch>/)")
    add("--resume", nargs="?", const="last", metavar="PATH", help="PATH or last.pth (default: no)")
    add("--dry-run", action="store_true", help="one batch per epoch: a smoke test")
    add("--sync-bn", action="store_true", help="torchrun on GPUs: batch norm over all processes")
    add("--compile", action="store_true", help="torch.compile the model")
    add_model_args(parser)
    return parser


if __name__ == "__main__":
    utils.run_command(main, get_args_parser(), out_of_memory_message)
