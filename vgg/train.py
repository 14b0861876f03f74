"""Train VGG on the flower split, or on any train/ + val/ ImageFolder split.

    $ python vgg/train.py                                 # vgg16 from scratch, 30 epochs
    $ python vgg/train.py --arch vgg16_bn --weights imagenet --freeze-backbone
    $ python vgg/train.py --device cpu --arch vgg11_bn --epochs 3 --image-size 128
    $ python vgg/train.py --resume                        # continue runs/vgg16/last.pth

Defaults: vgg16, 30 epochs, batch 32, AdamW with peak lr 1e-4 (one epoch of warm-up, then
cosine decay; VGG without batch norm diverges at higher rates), weight decay 0.05, 224 x 224
crops. Outputs go to vgg/runs/<arch>/: best.pth, last.pth, metrics.csv, curves.png and
confusion_matrix.png.
"""

import _thread
import argparse
import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torchvision
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from model import ARCHS

FOLDER = Path(__file__).resolve().parent
ROOT = FOLDER.parent
FAMILY = "vgg"
DEFAULTS = {"arch": "vgg16", "epochs": 30, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.05,
            "label_smoothing": 0.0, "augment": "crop-flip", "crop_scale": 0.08,
            "image_size": 224}  # fmt: skip
# ImageNet's mean and std: what torchvision's pretrained weights expect, and fine from scratch.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=DEFAULTS["arch"], choices=list(ARCHS),
                        help=f"network (default: {DEFAULTS['arch']})")  # fmt: skip
    parser.add_argument(
        "--weights",
        default=None,
        metavar="imagenet|PATH",
        help="start from ImageNet weights: 'imagenet' fetches torchvision's through its "
        "weights registry, PATH reads a torchvision-format state dict such as "
        "vgg16-397923af.pth (default: random initialisation)",
    )
    parser.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="with --weights: train only the new classifier (default: train every layer)",
    )


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.freeze_backbone and not args.weights:
        raise TrainingError("--freeze-backbone needs --weights: a random backbone stays random")
    if not args.weights:
        return ARCHS[args.arch](num_classes=num_classes)
    model = ARCHS[args.arch]()  # 1000 classes: the shape of the ImageNet weights
    try:
        model.load_state_dict(read_pretrained(args), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise TrainingError(f"--weights {args.weights} does not fit {args.arch}: {detail}") from e
    if args.freeze_backbone:
        model.features.requires_grad_(False)
    last = model.classifier[-1]
    model.classifier[-1] = nn.Linear(last.in_features, num_classes)  # a new head
    return model


def compute_loss(output: torch.Tensor, targets: torch.Tensor, criterion: nn.Module):
    """The loss to train on and the logits to score."""
    return criterion(output, targets), output


def read_pretrained(args: argparse.Namespace) -> dict:
    """The 1000-class ImageNet state dict that --weights names."""
    if args.weights == "imagenet":
        weights = torchvision.models.get_model_weights(args.arch).DEFAULT
        try:
            return weights.get_state_dict(progress=True)  # cached by torch.hub after one download
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrainingError(
                f"cannot download the ImageNet weights of {args.arch} from {weights.url} "
                f"({reason}); fetch that file elsewhere and pass --weights PATH"
            ) from e
    path = Path(args.weights).expanduser()
    if not path.is_file():
        raise TrainingError(f"--weights {args.weights}: no such file (or use --weights imagenet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but plain data, with varied errors
        raise TrainingError(
            f"--weights {path} is not a state dict this script can read (only tensors and "
            f"plain values are loaded, never other objects)"
        ) from e
    if isinstance(state, dict) and "family" in state:
        raise TrainingError(f"--weights {path} is a checkpoint of this project: use --resume")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise TrainingError(f"--weights {path} is not a torchvision-format state dict")
    return state


class TrainingError(Exception):
    """A problem with the user's input or run, reported as one line without a traceback."""


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device --device names; a CUDA one always with its index, as set_device needs.

    Under torchrun (local_rank given) a process uses the GPU of its LOCAL_RANK; otherwise the
    GPU named, or the current one for "cuda" and "auto".
    """
    if name == "auto":
        if torch.cuda.is_available():
            device = cuda_device("cuda", local_rank)
            problem = cuda_problem(device.index)
            if problem is None:
                return device
            print(f"note: {problem}; training on the CPU", file=sys.stderr)
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise TrainingError(
            f"--device {name}: not a device this script runs on; use auto, cpu, cuda, cuda:N or mps"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda":
        device = cuda_device(name, local_rank)
        if problem := cuda_problem(device.index):
            raise TrainingError(f"--device {name}: {problem}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps: MPS is not available here; use --device cpu")
    return device


def cuda_device(name: str, local_rank: int | None) -> torch.device:
    """cuda:N for --device name (cuda or cuda:N), or for this torchrun process's LOCAL_RANK."""
    count = torch.cuda.device_count()
    if local_rank is not None:
        if local_rank >= count:
            processes = os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)
            raise TrainingError(
                f"torchrun started {processes} processes on this machine, which has {count} "
                f"CUDA device(s): pass --nproc_per_node={count} (one process per GPU)"
            )
        return torch.device("cuda", local_rank)
    index = torch.device(name).index
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        raise TrainingError(
            f"--device {name}: this machine has {count} CUDA device(s), numbered from 0"
        )
    return torch.device("cuda", index)


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


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the torchrun job if there is one; return this process's device.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: one process per GPU talking over NCCL, or
    processes on the CPU talking over gloo. A plain `python train.py` is a world of one.
    """
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.distributed = args.world_size > 1
    if args.distributed and args.workers == get_args_parser().get_default("workers"):
        # The default is for the whole machine: its processes share the cores.
        args.workers = max(1, args.workers // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if args.distributed else None
    device = pick_device(args.device, local_rank)
    if args.distributed and device.type == "mps":
        raise TrainingError(
            "torchrun on MPS: PyTorch's DistributedDataParallel does not run there; train in "
            "one process (python train.py), or pass --device cpu to run the processes on the CPU"
        )
    if device.type == "cuda":  # cuda:N: kernels, memory figures and autocast all use GPU N
        torch.cuda.set_device(device)
    if args.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bfloat16 (AVX-512 BF16 or AMX); elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_amp(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None for plain fp32) and why. "auto" picks what is fast here."""
    if name == "fp16" and device.type == "cpu":
        raise TrainingError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or --amp off")
    if name != "auto":
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], f"{name} (--amp)"
    if device.type == "cuda":
        # is_bf16_supported() also says yes where bf16 is only emulated (before Ampere, 8.0),
        # which is slower than fp16 on the tensor cores of 7.x.
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"bf16: compute capability {major}.{minor} runs it natively"
        if major == 7:
            return torch.float16, (f"fp16 with a grad scaler: tensor cores of compute "
                                   f"capability {major}.{minor}, no native bf16")  # fmt: skip
        return torch.float16, (f"fp16 with a grad scaler: it halves the activations' memory on "
                               f"compute capability {major}.{minor}; --amp off may be faster "
                               f"there")  # fmt: skip
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16, "bf16: this CPU has AVX-512 BF16 or AMX"
    return None, f"off: no fast half precision on {device.type} here"


def build_transforms(image_size: int, augment: str, crop_scale: float
                     ) -> tuple[T.Compose, T.Compose]:  # fmt: skip
    """Training augmentation and the validation preprocessing (predict.py repeats the latter).

    A training crop covers from crop_scale of the photo's area to all of it.

    Both take a PIL image or a uint8 tensor. The first two steps of the validation pipeline
    are its deterministic resize and crop, which --cache applies once (see load_datasets).
    """
    strong = augment == "trivialaugment"
    train = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            *([T.TrivialAugmentWide()] if strong else []),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(MEAN, STD),
            *([T.RandomErasing(0.25)] if strong else []),
        ]
    )
    val = T.Compose(
        [
            T.Resize(round(image_size / 0.875), antialias=True),  # 256 for 224, as on ImageNet
            T.CenterCrop(image_size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(MEAN, STD),
        ]
    )
    return train, val


def load_image(path: str, draft: int | None = None) -> Image.Image:
    """open_rgb for the datasets: an unreadable image stops training with its name."""
    try:
        return open_rgb(Path(path), draft)
    except ValueError as e:
        raise TrainingError(
            f"cannot read image {path} ({e}); remove it or run split_data.py again"
        ) from e


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


class CachedImages(Dataset):
    """A dataset decoded once into memory as uint8 tensors, and transformed from there.

    prepare runs once per image (decode, shrink); transform on every access (augmentation).
    Only the indices in keep are decoded (default: all): under torchrun, a process's share.
    """

    def __init__(self, folder: ImageFolder, prepare, transform, workers: int,
                 keep: range | None = None) -> None:  # fmt: skip
        self.targets = folder.targets
        self.transform = transform
        keep = range(len(folder.samples)) if keep is None else keep
        paths = [folder.samples[i][0] for i in keep]
        with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow releases the GIL
            decoded = pool.map(lambda path: prepare(folder.loader(path)), paths)
            decoded = list(tqdm(decoded, total=len(paths), desc="caching", leave=False))
        self.images = [None] * len(folder.samples)
        for i, image in zip(keep, decoded, strict=True):
            self.images[i] = image
        self.decoded = len(decoded)
        self.nbytes = sum(image.numel() for image in decoded)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.targets[index]


class EpochSampler(DistributedSampler):
    """This process's share of a seeded shuffle, as (epoch, index) keys for SeededSamples."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


class SeededSamples(Dataset):
    """Draws each sample's augmentation from its own seed (seed, epoch, index).

    The random crops then do not depend on how samples are spread over processes and loader
    workers, nor on what ran before: a resumed or a distributed run sees the same images.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # The CPU generator alone (torch.manual_seed would also queue every GPU's: 50x slower),
        # put back afterwards so the training process's own random stream is untouched.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(hash((self.seed, epoch, index)) & 0xFFFF_FFFF_FFFF)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def shrink_to(shorter: int):
    """A function that makes a uint8 tensor of a PIL image whose shorter side is at most shorter."""

    def prepare(image: Image.Image) -> torch.Tensor:
        if min(image.size) > shorter:
            image = TF.resize(image, shorter, antialias=True)
        return TF.pil_to_tensor(image)

    return prepare


def load_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, list[str]]:
    """The ImageFolder train/ and val/ of --data-path, which must have the same classes."""
    train_tf, val_tf = build_transforms(args.image_size, args.augment, args.crop_scale)
    # JPEGs are decoded at no less than twice the size the transforms need: training crops
    # from twice the crop size, validation from twice its resize.
    loaders = {"train": partial(load_image, draft=2 * args.image_size),
               "val": partial(load_image, draft=2 * round(args.image_size / 0.875))}  # fmt: skip
    sets = {}
    for split, transform in (("train", train_tf), ("val", val_tf)):
        folder = args.data_path / split
        if not folder.is_dir():
            raise TrainingError(
                f"data folder {folder} not found: run `python split_data.py` first "
                f"(or pass --data-path DIR with train/ and val/ inside)"
            )
        refuse_linked_folders(folder)
        try:
            sets[split] = ImageFolder(folder, transform, loader=loaders[split])
        except (FileNotFoundError, OSError) as e:
            raise TrainingError(
                f"{folder}: {e}; run `python split_data.py` to make the split"
            ) from e
    train_set, val_set = sets["train"], sets["val"]
    if train_set.classes != val_set.classes:
        raise TrainingError(
            f"train/ and val/ of {args.data_path} have different classes "
            f"({train_set.classes} vs {val_set.classes}); run `python split_data.py` again"
        )
    if len(train_set.classes) < 2:
        raise TrainingError(
            f"{args.data_path / 'train'} holds one class ({train_set.classes[0]}): a classifier "
            f"needs at least two class folders"
        )
    classes = train_set.classes
    if use_cache(args, train_set, val_set):
        # Training keeps at most twice the crop size to crop from; validation keeps the
        # output of its deterministic resize and crop, so its results do not change.
        val_prepare = T.Compose([*val_tf.transforms[:2], T.PILToTensor()])
        train_set = CachedImages(train_set, shrink_to(2 * args.image_size), train_tf,
                                 args.workers)  # fmt: skip
        # Each process validates every world_size-th image (build_loaders): it caches those.
        share = range(args.rank, len(val_set), args.world_size)
        val_set = CachedImages(val_set, val_prepare, T.Compose(val_tf.transforms[2:]),
                               args.workers, share)  # fmt: skip
        mib = (train_set.nbytes + val_set.nbytes) / 2**20
        if args.rank == 0:
            each = " in each process" if args.distributed else ""
            print(f"cached {train_set.decoded + val_set.decoded} decoded images ({mib:.0f} MiB"
                  f"{each})")  # fmt: skip
    return train_set, val_set, classes


def use_cache(args: argparse.Namespace, train_set: ImageFolder, val_set: ImageFolder) -> bool:
    """--cache on or off; auto: on when the decoded images fit comfortably in free memory."""
    if args.cache != "auto":
        return args.cache == "on"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # each process caches its own
    need = decoded_bytes(train_set, val_set, args.image_size, args.world_size) * processes
    free = available_memory()
    use = free is not None and need < free / 4
    if args.rank == 0:
        room = "an unknown amount of" if free is None else f"{free / 2**20:.0f} MiB"
        print(f"--cache auto: {'on' if use else 'off'}, the decoded images take about "
              f"{need / 2**20:.0f} MiB of the {room} RAM free")  # fmt: skip
    return use


def decoded_bytes(train_set: ImageFolder, val_set: ImageFolder, image_size: int,
                  world_size: int = 1) -> int:  # fmt: skip
    """What CachedImages would hold in one process, from the image headers (nothing is decoded)."""
    total = 3 * image_size**2 * -(-len(val_set) // world_size)  # val: its crops, its share
    for path, _ in train_set.samples:  # training keeps at most twice the crop size
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # named when training reads it
        scale = min(1.0, 2 * image_size / min(width, height))
        total += 3 * round(width * scale) * round(height * scale)
    return total


def available_memory() -> int | None:
    """Bytes of RAM free for new work (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def refuse_linked_folders(split: Path) -> None:
    """Refuse symbolic links to folders inside the class folders of a split.

    ImageFolder follows them, so `ln -s .. daisy/up` would silently add every class's photos
    to daisy, and a link to . repeats a folder up to the OS's limit. A class folder itself may
    be a link (to photos kept elsewhere), but not to the split or a folder above it.
    """
    for class_dir in sorted(p for p in split.iterdir() if p.is_dir()):
        if class_dir.is_symlink() and split.resolve().is_relative_to(class_dir.resolve()):
            raise TrainingError(f"{class_dir} is a symbolic link to a folder that holds the split "
                                f"itself; remove it")  # fmt: skip
        for dirpath, dirnames, _ in os.walk(class_dir):
            for link in (Path(dirpath, name) for name in dirnames):
                if link.is_symlink():
                    raise TrainingError(
                        f"{link} is a symbolic link to a folder; training reads only real "
                        f"folders inside a class: replace it by the photos or remove it"
                    )


def build_loaders(
    train_set: Dataset, val_set: Dataset, args: argparse.Namespace, device: torch.device
) -> tuple[EpochSampler, DataLoader, DataLoader]:
    """This process's training and validation loaders, and the sampler to tell the epoch."""
    loader_kwargs = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": args.workers > 0,
    }
    # A shuffle seeded by (seed, epoch), split over the processes; with per-sample seeds for
    # the augmentation, a resumed run sees exactly the batches an uninterrupted one would.
    sampler = EpochSampler(
        train_set,
        num_replicas=args.world_size,
        rank=args.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    train_loader = DataLoader(
        SeededSamples(train_set, args.seed),
        sampler=sampler,
        drop_last=len(sampler) % args.batch_size == 1,  # batch norm cannot train on 1 image
        **loader_kwargs,
    )
    val_shard = Subset(val_set, range(args.rank, len(val_set), args.world_size))
    val_loader = DataLoader(val_shard, shuffle=False, **loader_kwargs)
    return sampler, train_loader, val_loader  # fmt: skip


def check_image_size(model: nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    """Fail early, in one line, when --image-size does not fit the network."""
    probe = torch.zeros(2, 3, args.image_size, args.image_size, device=device)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    try:
        with torch.no_grad():
            model.eval()(probe)
            if not has_bn:  # train mode runs extra heads (GoogLeNet's); BN statistics must not move
                model.train()(probe)
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or type(e).__name__ == "AcceleratorError":
            raise  # the GPU's own trouble, not the image size
        raise TrainingError(
            f"--image-size {args.image_size} is too small for {args.arch} "
            f"({str(e).splitlines()[0]}); use a larger --image-size"
        ) from e
    finally:
        model.train()


def share_buffers(model: nn.Module, args: argparse.Namespace) -> None:
    """Give every process rank 0's batch-norm statistics, the ones best.pth keeps.

    DDP sends them before each training forward, which then updates each process's own copy;
    without --sync-bn they differ a little after the last step of an epoch.
    """
    if args.distributed and not args.sync_bn:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (1-d tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass: faster on CPUs and GPUs alike.
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


def make_scheduler(optimizer, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """One epoch of linear warm-up (a fifth of the run at most), then cosine decay to zero,
    stepped once per optimizer step."""
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(steps_per_epoch, total_steps // 5)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def to_device(images, targets, device: torch.device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=non_blocking)


def train_one_epoch(
    model, criterion, optimizer, scheduler, scaler, loader, device, amp_dtype, epoch, args
) -> dict:
    """One pass over this process's training batches; loss, accuracy, speed and data wait.

    With --accum-steps N the gradients of N batches add up before each optimizer step, so a
    step sees N x --batch-size images (the last step of an epoch takes the batches left). Each
    batch's loss counts by its share of the step's images: the step is the mean over them, as
    one large batch would have it. The totals stay on the device, read every few batches
    only: each read waits for the GPU.
    """
    model.train()
    for module in model.modules():  # a frozen layer (--freeze-backbone) keeps its statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            module.train(module.weight.requires_grad)
    accum = args.accum_steps
    batches = min(accum, len(loader)) if args.dry_run else len(loader)
    samples = len(loader.sampler)
    batch_sizes = [min(args.batch_size, samples - i * args.batch_size) for i in range(batches)]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # images, loss x images, correct
    bar = tqdm(total=batches, desc=f"epoch {epoch}/{args.epochs} train", leave=False,
               dynamic_ncols=True, mininterval=1.0, disable=args.rank != 0)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    waited, start = 0.0, time.perf_counter()
    ready = start
    for batch, (images, targets) in enumerate(loader, 1):
        waited += time.perf_counter() - ready  # time spent waiting for this batch
        images, targets = to_device(images, targets, device)
        last_of_step = batch % accum == 0 or batch == batches
        first = (batch - 1) // accum * accum
        share = targets.size(0) / sum(batch_sizes[first : first + accum])
        # Under DDP, gradients are averaged over the processes once per optimizer step.
        no_sync = args.distributed and not last_of_step and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, logits = compute_loss(model(images), targets, criterion)
            scaler.scale(loss * share).backward()
        if last_of_step:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        sums[0] += targets.size(0)
        sums[1] += loss.detach().double() * targets.size(0)
        sums[2] += (logits.argmax(1) == targets).sum()
        bar.update()
        if batch % 20 == 0 or batch == batches:
            seen, loss_sum, correct = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
        if batch >= batches:
            break
        ready = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - start
    if args.distributed:  # totals over every process
        dist.all_reduce(sums)
    seen, loss_sum, correct = sums.tolist()
    if not math.isfinite(loss_sum):  # judged on the totals: every process stops alike
        raise TrainingError(
            f"loss became {loss_sum / seen} in epoch {epoch}: training diverged; try a lower "
            f"--lr (now {args.lr:g})"
        )
    return {"loss": loss_sum / seen, "acc": correct / seen, "seconds": seconds,
            "img_s": seen / seconds, "data_wait": waited / seconds}  # fmt: skip


@torch.no_grad()
def evaluate(model, criterion, loader, device, amp_dtype, args, desc="val") -> dict:
    """Loss and accuracy of the main head on every sample of val, plus the predictions.

    Distributed, each process evaluates every world_size-th sample and the results are
    gathered, so every sample counts exactly once (a process may have none). The sums and
    predictions stay on the device until the end: each read would wait for the GPU.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    predictions, labels = [empty], [empty]
    steps = 1 if args.dry_run else len(loader)
    bar = tqdm(loader, total=steps, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=args.rank != 0)  # fmt: skip
    for step, (images, targets) in enumerate(bar, 1):
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets).double() * targets.size(0)
        predictions.append(logits.argmax(1))
        labels.append(targets)
        if step >= steps:
            break
    bar.close()
    loss_sum = loss_sum.item()
    predictions, labels = torch.cat(predictions).cpu(), torch.cat(labels).cpu()
    if args.distributed:
        parts = [None] * args.world_size
        dist.all_gather_object(parts, (loss_sum, predictions, labels))
        loss_sum = sum(part[0] for part in parts)
        predictions = torch.cat([part[1] for part in parts])
        labels = torch.cat([part[2] for part in parts])
    seen = labels.numel()
    return {"loss": loss_sum / seen, "acc": (predictions == labels).float().mean().item(),
            "predictions": predictions, "labels": labels}  # fmt: skip


def save_checkpoint(state: dict, path: Path) -> None:
    write_file(path, partial(torch.save, state))


def write_file(path: Path, write) -> None:
    """Fill path atomically: write(f) writes a temporary file beside it, then a rename.

    Whatever goes wrong (a full disk, Ctrl-C), path keeps its previous content and no
    temporary file is left behind; a failure to write is one TrainingError line.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError whose context is the OSError.
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainingError(f"no space left on {path.parent} to write {path.name}") from e
        raise TrainingError(f"cannot write {path} ({cause.strerror or cause})") from e
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint that this family's train.py wrote; never unpickles arbitrary objects."""
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but plain data, with varied errors
        raise TrainingError(
            f"{path} is not a checkpoint this script can read (only tensors and plain values "
            f"are loaded, never other objects)"
        ) from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "family" not in checkpoint:
        raise TrainingError(f"{path} is not a checkpoint written by a train.py of this project")
    if checkpoint["family"] != FAMILY:
        raise TrainingError(
            f"{path} holds {checkpoint.get('arch')} of the {checkpoint['family']} folder, "
            f"not a {FAMILY} network; use {checkpoint['family']}/train.py"
        )
    return checkpoint


def write_atomically(path: Path, text: str) -> None:
    write_file(path, lambda f: f.write(text.encode()))


def history_row(epoch: int, train: dict, val: dict, lr: float, device: torch.device) -> dict:
    """One epoch's row of metrics.csv and of the history that last.pth keeps."""
    row = {
        "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
        "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr, "seconds": train["seconds"],
        "img_s": train["img_s"], "data_wait": train["data_wait"],
    }  # fmt: skip
    if device.type == "cuda":  # the most this epoch's tensors took on this process's GPU, GiB
        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def epoch_line(row: dict, epochs: int) -> str:
    """The one line printed per epoch; data_wait is the share of time spent waiting for data."""
    line = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.3f}  "
            f"train_acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.3f}  "
            f"val_acc {row['val_acc']:.3f}  lr {row['lr']:.1e}  {row['seconds']:.0f}s  "
            f"{row['img_s']:.0f} img/s  data_wait {row['data_wait']:.0%}")  # fmt: skip
    if "gpu_mem_gib" in row:
        line += f"  gpu_mem {row['gpu_mem_gib']:.2f} GiB"
    return line


def report_epoch(row: dict, first: bool, cached: bool, args: argparse.Namespace) -> None:
    """The epoch's line; after the first epoch, a hint if training mostly waited for data."""
    print(epoch_line(row, args.epochs))
    if first and row["data_wait"] > 0.3:
        cache = "" if cached else "--cache on or "
        print(f"note: training waited for data {row['data_wait']:.0%} of the time; "
              f"{cache}more --workers (now {args.workers}) can feed it faster")  # fmt: skip


def write_metrics(history: list[dict], output_dir: Path) -> None:
    """metrics.csv, rewritten whole after every epoch."""
    columns = list(history[-1])  # a run resumed from an older checkpoint has fewer in early rows
    lines = [",".join(columns)]
    lines += [",".join(f"{row.get(c, math.nan):.6g}" for c in columns) for row in history]
    write_atomically(output_dir / "metrics.csv", "\n".join(lines) + "\n")


def draw_curves(history: list[dict], output_dir: Path) -> None:
    """curves.png: loss and accuracy of train and val per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], "o-", label=split)
        ax_acc.plot(epochs, [row[f"{split}_acc"] for row in history], "o-", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, output_dir / "curves.png")


def save_figure(fig: Figure, path: Path) -> None:
    write_file(path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=100))


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


def report_confusion(result: dict, classes: list[str], path: Path) -> None:
    """Print per-class accuracy and save the confusion matrix of result as a picture."""
    k = len(classes)
    matrix = torch.bincount(result["labels"] * k + result["predictions"], minlength=k * k)
    matrix = matrix.reshape(k, k)
    width = max(len(c) for c in classes) + 2
    print(f"{'class':<{width}}{'val images':>11}{'accuracy':>10}")
    for i, name in enumerate(classes):
        total = matrix[i].sum().item()
        acc = matrix[i, i].item() / total if total else float("nan")
        print(f"{name:<{width}}{total:>11}{acc:>10.3f}")
    save_figure(confusion_figure(matrix, classes, f"val accuracy {result['acc']:.3f}"), path)


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


def resume_command(last: Path) -> str:
    """The command line that continues this run from last."""
    return command_with({"--resume": str(last)})


def command_with(changes: dict[str, str]) -> str:
    """This run's command line with the flags in changes set to new values."""
    aliases = {"-b": "--batch-size", "-j": "--workers", "--wd": "--weight-decay"}
    kept, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            if not arg.startswith("-"):  # the value of a replaced flag (--resume may have none)
                continue
        name = arg.split("=", 1)[0]
        if aliases.get(name, name) in changes:
            skip = "=" not in arg
            continue
        kept.append(arg)
    launcher = ["python"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun: restart the same way
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}"]
        if os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:
            launcher.insert(1, "--standalone")
    changed = [part for flag, value in changes.items() for part in (flag, value)]
    return shlex.join([*launcher, sys.argv[0], *kept, *changed])


def out_of_memory_message(args: argparse.Namespace) -> str:
    """What to do when the GPU's memory does not hold a training step at this batch size: half
    the batch, twice --accum-steps (the same optimizer step), continuing from last.pth if the
    run saved one (--resume takes a batch split so: see read_resume_checkpoint)."""
    changes = {"--batch-size": str(max(1, args.batch_size // 2)),
               "--accum-steps": str(2 * args.accum_steps)}  # fmt: skip
    last = output_dir_of(args) / "last.pth"
    if last.is_file():
        changes["--resume"] = str(last)
    what = "continue" if last.is_file() else "the same training"
    amp = "; --amp bf16 or fp16 also halves the activations" if args.amp == "off" else ""
    return (f"CUDA ran out of memory at --batch-size {args.batch_size}; {what} in about half "
            f"the memory: {command_with(changes)}{amp}")  # fmt: skip


def output_dir_of(args: argparse.Namespace) -> Path:
    return (args.output_dir or FOLDER / "runs" / args.arch).expanduser().resolve()


def raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(parser)
    add_recipe_args(parser)
    add_run_args(parser)
    add_model_args(parser)
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "data", "The photos: where they are, at what size, and how they are read."
    )
    group.add_argument(
        "--data-path",
        type=Path,
        default=ROOT / "data" / "flower_data",
        help="folder with train/ and val/ (default: data/flower_data of this repository)",
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=DEFAULTS["image_size"],
        help=f"training crop size in pixels (default: {DEFAULTS['image_size']})",
    )
    group.add_argument(
        "--cache",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode every image once into memory and augment from there: fastest when "
        "decoding is the bottleneck (small images, GPUs), at the cost of RAM; --cache alone is "
        "on (default: auto: on when the decoded images take under a quarter of the free RAM)",
    )
    group.add_argument(
        "-j",
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loading processes (default: the CPU count, at most 8; "
        f"{min(8, os.cpu_count() or 1)} here)",
    )


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "training recipe", "How the network learns: what a run trains, and which weights it keeps."
    )
    group.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS["epochs"],
        help=f"number of epochs (default: {DEFAULTS['epochs']})",
    )
    group.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help=f"images per batch (default: {DEFAULTS['batch_size']})",
    )
    group.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        help="batches whose gradients add up before each optimizer step: the same training "
        "as a batch N times larger, in the memory of one (default: 1)",
    )
    group.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS["lr"],
        help=f"peak learning rate of AdamW (default: {DEFAULTS['lr']:g}); one "
        "epoch of linear warm-up, then cosine decay",
    )
    group.add_argument(
        "--wd",
        "--weight-decay",
        dest="weight_decay",
        type=float,
        default=DEFAULTS["weight_decay"],
        help=f"AdamW weight decay, not on biases and norms (default: {DEFAULTS['weight_decay']:g})",
    )
    group.add_argument(
        "--label-smoothing",
        type=float,
        default=DEFAULTS["label_smoothing"],
        help="share of each target spread over the other classes "
        f"(default: {DEFAULTS['label_smoothing']:g})",
    )
    group.add_argument(
        "--augment",
        default=DEFAULTS["augment"],
        choices=["crop-flip", "trivialaugment"],
        help="training augmentation: crop-flip is a random resized crop and a horizontal flip; "
        "trivialaugment adds torchvision's TrivialAugmentWide and random erasing "
        f"(default: {DEFAULTS['augment']})",
    )
    group.add_argument(
        "--crop-scale",
        type=float,
        default=DEFAULTS["crop_scale"],
        metavar="MIN",
        help="each training crop covers from MIN of the photo's area to all of it: smaller "
        f"is stronger augmentation (default: {DEFAULTS['crop_scale']:g})",
    )
    group.add_argument(
        "--keep",
        default="last",
        choices=["last", "best-val"],
        help="the weights best.pth holds for predict.py: the last epoch's, or those of the "
        "epoch with the highest val accuracy (the earliest of ties); on a small val set the "
        "highest is mostly chance (default: last)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "running", "Where and how a run executes, and what it continues from."
    )
    group.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default: auto: CUDA, then MPS, then CPU)",
    )
    group.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="mixed precision (default: auto: bf16 on GPUs that have it, else "
        "fp16; bf16 on CPUs with AVX-512 BF16 or AMX; off elsewhere)",
    )
    group.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where checkpoints, metrics and plots go (default: {FAMILY}/runs/<arch>/)",
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint (default without PATH: last.pth in --output-dir)",
    )
    group.add_argument(
        "--test-only",
        action="store_true",
        help="only evaluate a checkpoint on val: --resume PATH, or by "
        "default best.pth in --output-dir (default: off)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="one training and one validation batch per epoch, a smoke test (default: off)",
    )
    group.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: batch norm statistics over all processes (default: off)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (default: off; pays off on long GPU runs)",
    )


def main(args: argparse.Namespace) -> None:
    check_args(args)
    args.data_path = args.data_path.expanduser().resolve()
    output_dir = output_dir_of(args)
    device = init_distributed(args)
    is_main = args.rank == 0  # only it prints, plots and writes checkpoints
    if args.sync_bn and args.distributed and device.type != "cuda":
        raise TrainingError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU")
    if is_main:
        prepare_output_dir(output_dir)
    resumed = None if args.test_only else read_resume_checkpoint(args, output_dir, is_main)
    amp_dtype, amp_reason = pick_amp(args.amp, device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_set, val_set, classes = load_datasets(args)
    sampler, train_loader, val_loader = build_loaders(train_set, val_set, args, device)

    model = build_model(args, len(classes)).to(device, memory_format=torch.channels_last)
    check_image_size(model, args, device)
    if args.sync_bn and args.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if is_main:
        world = f"{args.world_size} processes x " if args.distributed else ""
        workers = f"{args.workers} workers" + (" per process" if args.distributed else "")
        print(f"{args.arch} on {device}, amp {amp_reason}, channels_last, {workers}, "
              f"batch {world}{args.batch_size}: {len(train_set)} train / {len(val_set)} val "
              f"images, {len(classes)} classes")  # fmt: skip

    if args.test_only:
        evaluate_checkpoint(model, criterion, val_loader, device, amp_dtype, args, classes,
                            output_dir)  # fmt: skip
        return

    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, steps_per_epoch(len(train_loader), args), args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history, start_epoch, best_acc, best_epoch, kept_val = [], 1, -1.0, 0, None
    if resumed is not None:
        check_compatible(resumed, args, classes, resumed["path"])
        history, start_epoch, best_acc, best_epoch = restore(resumed, model, optimizer,
                                                             scheduler, scaler)  # fmt: skip
        if is_main:
            print(f"resumed from {resumed['path']} at epoch {resumed['epoch']}")
    train_model = model
    if args.distributed:
        device_ids = None if device.type == "cpu" else [device.index]
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        train_model = torch.compile(train_model)

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    started = time.perf_counter()
    epoch, writer = start_epoch, EpochWriter(output_dir, args.keep, args.epochs, start_epoch - 1)
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            sampler.set_epoch(epoch)
            # Dropout draws from a generator seeded per (seed, process, epoch): the processes
            # differ, and a resumed run draws what an uninterrupted one would.
            torch.manual_seed(hash((args.seed, args.rank, epoch)) & 0xFFFF_FFFF_FFFF)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train = train_one_epoch(train_model, criterion, optimizer, scheduler, scaler,
                                    train_loader, device, amp_dtype, epoch, args)  # fmt: skip
            share_buffers(model, args)
            val = evaluate(model, criterion, val_loader, device, amp_dtype, args)
            lr = optimizer.param_groups[0]["lr"]
            history.append(history_row(epoch, train, val, lr, device))
            improved = val["acc"] > best_acc
            if improved:
                best_acc, best_epoch = val["acc"], epoch
            if args.keep == "last" or improved:  # what best.pth holds; every process keeps
                kept_val = {**val, "epoch": epoch}  # its result: no shared folder is needed
            if not is_main:
                continue
            report_epoch(history[-1], epoch == start_epoch, isinstance(train_set, CachedImages),
                         args)  # fmt: skip
            state = checkpoint_state(model, classes, epoch, val["acc"], best_acc, best_epoch,
                                     args)  # fmt: skip
            training = training_state(optimizer, scheduler, scaler, history)
            writer.write(state, training, improved)
    except KeyboardInterrupt:
        if is_main:
            report_interrupt(epoch, writer.saved_epoch, output_dir)
        exit_interrupted()
    if kept_val is None:  # resumed, and no epoch since replaced the checkpoint's best.pth
        best_epoch_kept = load_kept_weights(model, output_dir, args)
        kept_val = evaluate(model, criterion, val_loader, device, amp_dtype, args, desc="best")
        kept_val["epoch"] = best_epoch_kept
    if is_main:
        report_confusion(kept_val, classes, output_dir / "confusion_matrix.png")
        report_end(kept_val, best_acc, best_epoch, time.perf_counter() - started, output_dir,
                   args)  # fmt: skip


def load_kept_weights(model: nn.Module, output_dir: Path, args: argparse.Namespace) -> int:
    """Put best.pth's weights into model and return its epoch. Rank 0 alone reads the file and
    sends the weights to the other processes, whose machines may not share the folder."""
    epoch = [0]
    if args.rank == 0:
        best = load_checkpoint(output_dir / "best.pth")
        model.load_state_dict(best["model"])
        epoch = [best["epoch"]]
    if args.distributed:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
        dist.broadcast_object_list(epoch, 0)
    return epoch[0]


def checkpoint_state(model: nn.Module, classes: list[str], epoch: int, val_acc: float,
                     best_acc: float, best_epoch: int, args: argparse.Namespace
                     ) -> dict:  # fmt: skip
    """What best.pth holds, and last.pth with the training state added: plain data only."""
    return {
        "family": FAMILY, "arch": args.arch, "model": model.state_dict(), "classes": classes,
        "image_size": args.image_size, "mean": MEAN, "std": STD, "epoch": epoch,
        "val_acc": val_acc, "best_acc": best_acc, "best_epoch": best_epoch,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }  # fmt: skip


def training_state(optimizer, scheduler, scaler, history: list[dict]) -> dict:
    """What last.pth adds to best.pth's contents: all that restore() puts back to continue.

    No random state: the data order, the augmentation and dropout are seeded per epoch (and
    image), so a resumed run draws what an uninterrupted one would.
    """
    return {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "history": history,
    }  # fmt: skip


def report_interrupt(epoch: int, saved_epoch: int, output_dir: Path) -> None:
    if saved_epoch == 0:
        print(f"\ninterrupted in epoch {epoch}, before any epoch was saved; run again",
              file=sys.stderr)  # fmt: skip
        return
    last = output_dir / "last.pth"
    print(f"\ninterrupted in epoch {epoch}; {last} holds epoch {saved_epoch}. Continue "
          f"with:\n  {resume_command(last)}")  # fmt: skip


def report_end(kept_val: dict, best_acc: float, best_epoch: int, seconds: float,
               output_dir: Path, args: argparse.Namespace) -> None:  # fmt: skip
    kept = (f"best.pth keeps epoch {kept_val['epoch']}" if args.keep == "best-val" else
            f"best.pth keeps the last epoch (val_acc {kept_val['acc']:.4f})")  # fmt: skip
    print(f"best val_acc {best_acc:.4f} at epoch {best_epoch}/{args.epochs}; {kept}; "
          f"{seconds / 60:.1f} min; outputs in {output_dir}")  # fmt: skip


def evaluate_checkpoint(model, criterion, loader, device, amp_dtype, args, classes,
                        output_dir: Path) -> None:  # fmt: skip
    """--test-only: val loss, accuracy and confusion matrix of best.pth (or --resume PATH)."""
    path = Path(args.resume) if args.resume not in (None, "last") else output_dir / "best.pth"
    checkpoint = load_checkpoint(path.expanduser().resolve())
    check_compatible(checkpoint, args, classes, path)
    model.load_state_dict(checkpoint["model"])
    result = evaluate(model, criterion, loader, device, amp_dtype, args)
    if args.rank == 0:
        print(f"{path}: val_loss {result['loss']:.4f}  val_acc {result['acc']:.4f}")
        report_confusion(result, classes, output_dir / "confusion_matrix.png")


def steps_per_epoch(batches: int, args: argparse.Namespace) -> int:
    """Optimizer steps per epoch: one per --accum-steps batches, the last one per the batches
    left (one with --dry-run)."""
    if args.dry_run:
        return 1
    if batches < args.accum_steps:
        raise TrainingError(
            f"--accum-steps {args.accum_steps} needs that many batches per epoch, and there are "
            f"{batches} of --batch-size {args.batch_size}; lower one of them"
        )
    return -(-batches // args.accum_steps)


def restore(resumed: dict, model, optimizer, scheduler, scaler) -> tuple[list, int, float, int]:
    """Put the training state of a checkpoint back; its history, next epoch and best so far."""
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    if resumed["scaler"]:  # empty when the run was bf16 or fp32: a new fp16 scaler starts
        scaler.load_state_dict(resumed["scaler"])
    return resumed["history"], resumed["epoch"] + 1, resumed["best_acc"], resumed["best_epoch"]


class EpochWriter:
    """Writes an epoch's outputs: metrics.csv every epoch; curves.png and last.pth (with
    --keep last, best.pth too) after the first and the last epoch of a run, and between them
    as soon as the time since their previous write is nine times what that write took.

    Writing then takes at most a tenth of a run: every epoch, unless epochs are short next to
    writing (a large network on a few photos: VGG16's last.pth alone is 1.5 GiB). With --keep
    best-val, best.pth is written whenever val accuracy improves. last.pth is written last: it
    is the epoch a resumed run continues from, and each file is written whole or not at all.
    """

    def __init__(self, output_dir: Path, keep: str, epochs: int, saved_epoch: int) -> None:
        self.output_dir, self.keep, self.epochs = output_dir, keep, epochs
        self.saved_epoch = saved_epoch  # the epoch last.pth holds; 0: none yet
        self.written_at, self.seconds = time.perf_counter(), 0.0  # the last write: end, length

    def write(self, state: dict, training: dict, improved: bool) -> None:
        started = time.perf_counter()
        due = state["epoch"] == self.epochs or started - self.written_at >= 9 * self.seconds
        best = due if self.keep == "last" else improved
        try:
            write_metrics(training["history"], self.output_dir)
            if due:
                draw_curves(training["history"], self.output_dir)
            if best:
                save_checkpoint(state, self.output_dir / "best.pth")
            if due:
                save_checkpoint({**state, **training}, self.output_dir / "last.pth")
        except TrainingError as e:
            kept = "nothing was saved yet"
            if self.saved_epoch:
                kept = (f"{self.output_dir / 'last.pth'} holds epoch {self.saved_epoch}; fix "
                        f"that, then continue with --resume")  # fmt: skip
            raise TrainingError(f"{e}; {kept}") from e
        if due:
            self.saved_epoch, self.written_at = state["epoch"], time.perf_counter()
            self.seconds = self.written_at - started


def check_args(args: argparse.Namespace) -> None:
    """One line for each flag value that cannot work, before anything starts."""
    for name in ("epochs", "batch_size", "image_size", "accum_steps"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise TrainingError("--workers must be 0 or more")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise TrainingError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise TrainingError(f"--weight-decay must be 0 or a positive number, got "
                            f"{args.weight_decay}")  # fmt: skip
    if not 0 <= args.label_smoothing < 1:  # also refuses nan
        raise TrainingError(f"--label-smoothing must be from 0 to below 1, got "
                            f"{args.label_smoothing}")  # fmt: skip
    if not 0 < args.crop_scale <= 1:
        raise TrainingError(f"--crop-scale must be above 0 and at most 1, got {args.crop_scale}")


def prepare_output_dir(output_dir: Path) -> None:
    """Create --output-dir and make sure it takes files, before any time is spent training."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        problem = "is a file" if output_dir.is_file() else f"cannot be written ({e.strerror or e})"
        raise TrainingError(
            f"--output-dir {output_dir} {problem}; pass --output-dir with a folder you can write"
        ) from e


def read_resume_checkpoint(args: argparse.Namespace, output_dir: Path, is_main: bool):
    """The checkpoint --resume names (with its path), or None; refuse to overwrite a run.

    The recipe flags are set to the checkpoint's values: the optimizer, the schedule and the
    data order all continue as they were. A different value given now is named, not silently
    dropped. Only --batch-size and --accum-steps may change, together, when their product
    stays: the same optimizer step in less memory (what the out-of-memory advice gives).
    """
    if args.resume is None:
        if (output_dir / "last.pth").exists():
            raise TrainingError(
                f"{output_dir} already holds a run: continue it with --resume, or pass "
                f"--output-dir for a new one"
            )
        return None
    path = output_dir / "last.pth" if args.resume == "last" else Path(args.resume)
    checkpoint = load_checkpoint(path.expanduser().resolve())
    if "optimizer" not in checkpoint:
        raise TrainingError(f"{path} holds no training state (resume from last.pth)")
    if args.epochs <= checkpoint["epoch"]:
        raise TrainingError(
            f"{path} has already trained {checkpoint['epoch']} epochs and --epochs is "
            f"{args.epochs}: nothing to train; pass a larger --epochs, or --test-only"
        )
    defaults = get_args_parser()
    names = ["lr", "weight_decay", "label_smoothing", "augment", "crop_scale", "keep",
             "image_size", "seed"]  # fmt: skip
    recipe = checkpoint.get("args", {})
    step = recipe.get("batch_size", 0) * recipe.get("accum_steps", 1)
    if args.batch_size * args.accum_steps != step:  # the same step split otherwise is kept
        names += ["batch_size", "accum_steps"]
    for name in names:
        given = getattr(args, name)
        saved = recipe.get(name, given)
        if given != saved:
            if is_main and given != defaults.get_default(name):
                print(f"note: --{name.replace('_', '-')} {given} is ignored: the resumed run "
                      f"keeps the checkpoint's {saved} (start a new run to change it)")  # fmt: skip
            setattr(args, name, saved)
    return {**checkpoint, "path": path}


def check_compatible(checkpoint: dict, args, classes: list[str], path: Path) -> None:
    """The checkpoint must be of this architecture and of this dataset's classes."""
    if checkpoint["arch"] != args.arch:
        raise TrainingError(
            f"{path} holds {checkpoint['arch']}, not {args.arch}; pass --arch "
            f"{checkpoint['arch']} or another checkpoint"
        )
    if checkpoint["classes"] != classes:
        raise TrainingError(
            f"{path} was trained on classes {checkpoint['classes']}, but {args.data_path} "
            f"has {classes}"
        )


if __name__ == "__main__":
    sys.unraisablehook = keep_ctrl_c
    arguments = get_args_parser().parse_args()
    rank = f"[rank {os.environ['RANK']}] " if "WORLD_SIZE" in os.environ else ""
    try:
        main(arguments)
    except TrainingError as e:
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep the
        # last line, which is ours.
        message = str(e)
        if message.startswith("Caught TrainingError"):
            message = message.strip().splitlines()[-1].split("TrainingError: ", 1)[-1]
        sys.exit(f"{rank}{FAMILY}/train.py: error: {message}")
    except KeyboardInterrupt:  # before the epoch loop, which reports its own interruption
        print(f"\n{FAMILY}/train.py: interrupted", file=sys.stderr)
        exit_interrupted()
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"{rank}{FAMILY}/train.py: error: {out_of_memory_message(arguments)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
