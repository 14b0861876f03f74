"""The plumbing of train.py and predict.py: device and precision, torchrun, photos, the cache
and seeded sampling, atomic writes and checkpoints, figures, one-line errors and Ctrl-C.

Byte-identical in the five folders (a test compares them), so that each folder runs on its
own: fix it in resnet/, then run `python tests/sync_shared.py`."""

import argparse
import atexit
import contextlib
import filecmp
import io
import json
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input or run, reported as one line without a traceback."""


# Device, precision and processes


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device --device names (auto: CUDA, MPS, the CPU); a GPU with its index, as set_device
    needs: LOCAL_RANK's under torchrun, else the one named or the current one."""
    available = {"cpu": True, "cuda": torch.cuda.is_available()}
    available["mps"] = torch.backends.mps.is_available()
    if auto := name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    try:
        device = torch.device(name)
    except RuntimeError:
        device = torch.device("meta")  # refused below
    if device.type not in available:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise UserError(f"--device {name}: {device.type} is not available here; use --device cpu")
    if device.type != "cuda":
        return device
    count, index = torch.cuda.device_count(), device.index if local_rank is None else local_rank
    index = torch.cuda.current_device() if index is None else index
    if index >= count and local_rank is not None:
        started = f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', index + 1)} processes"
        raise UserError(f"{started} for {count} CUDA device(s): pass --nproc_per_node={count}")
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s), from 0")
    if (problem := cuda_problem(index)) and auto:
        print(f"note: {problem}; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if problem:
        raise UserError(f"--device {name}: {problem}")
    return torch.device("cuda", index)


def cuda_problem(index: int) -> str | None:
    """Why this PyTorch build has no kernels for GPU index (it would fail at its first), or
    None. Native code sm_XY runs where torch's table says; PTX compute_XY on X.Y and later."""
    major, minor = torch.cuda.get_device_capability(index)
    device_cc, archs = 10 * major + minor, torch.cuda.get_arch_list()
    # torch's rule (torch 2.8 on); before it, the same major version at this minor or below.
    native = getattr(torch.cuda, "_code_compatible_with_device", None)
    native = native or (lambda device, code: device // 10 == code // 10 and device >= code)
    for kind, _, code in (arch.partition("_") for arch in archs):
        code = code.rstrip("af")  # sm_90a, sm_100f: the family variants of 9.0, 10.0
        ptx = kind == "compute" and code.isdigit() and device_cc >= int(code)
        if ptx or (kind == "sm" and code.isdigit() and native(device_cc, int(code))):
            return None
    if not archs:
        return None  # nothing to check against
    gpu = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    build = f"this PyTorch build ({' '.join(archs)}); install a build whose"
    return f"{gpu} has no kernels in {build} torch.cuda.get_arch_list() lists sm_{major}{minor}"


@dataclass(frozen=True)
class Run:
    """What set-up learns: the device and precision, and the place among torchrun's processes."""

    device: torch.device
    amp: torch.dtype | None  # autocast's dtype; None: plain fp32
    amp_reason: str
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    distributed = property(lambda self: self.world_size > 1)
    is_main = property(lambda self: self.rank == 0)  # the process that prints and writes

    def __str__(self) -> str:
        processes = f" x {self.world_size} processes" if self.distributed else ""
        return f"{self.device}{processes}, amp {self.amp_reason}"


def start_run(device_name: str, amp_name: str) -> Run:
    """Join the torchrun job if there is one (one process per GPU talking over NCCL, or
    processes on the CPU over gloo) and pick this process's device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if world_size > 1 else None
    device = pick_device(device_name, local_rank)
    if world_size > 1 and device.type == "mps":
        raise UserError("torchrun on MPS: DDP does not run there; use one process or --device cpu")
    if device.type == "cuda":  # cuda:N: kernels, memory figures and autocast all use GPU N
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # the fastest kernels for these fixed shapes
        # fp32 matrix products in TF32 where the GPU has it (convolutions already are).
        torch.backends.cuda.matmul.allow_tf32 = torch.cuda.get_device_capability(device)[0] >= 8
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if world_size > 1 else 1
    return Run(device, *pick_amp(amp_name, device), rank, world_size, local)


def distribute(model: nn.Module, run: Run, sync_bn: bool, compile: bool) -> nn.Module:
    """The model that trains: under torchrun wrapped in DDP, compiled with --compile."""
    if sync_bn and run.distributed and run.device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
    if sync_bn and run.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.distributed:
        ids = None if run.device.type == "cpu" else [run.device.index]
        model = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def averaging_gradients(model: nn.Module, run: Run, now: bool):
    """Under DDP, backward averages the gradients over the processes; between the optimizer
    steps of --accum-steps that is wasted work: no_sync() skips it until the step's last batch."""
    if run.distributed and not now and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def share_buffers(model: nn.Module, run: Run) -> None:
    """Rank 0's buffers (batch-norm statistics) to every process: theirs drift a little."""
    if run.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def loader_workers(workers: int | None, run: Run) -> int:
    """--workers, or by default the CPU count (at most 8) shared by this machine's processes."""
    cpus = min(8, os.cpu_count() or 1)
    return max(1, cpus // run.local_world_size) if workers is None else workers


def pick_amp(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None for plain fp32) and why. "auto" picks what is fast here:
    bf16 where it is native (compute capability 8.0 on, a CPU with AVX-512 BF16 or AMX), fp16
    on older GPUs, fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if name == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or --amp off")
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if name == "off" and major >= 8:  # start_run allows TF32
        return (
            None,
            f"off (--amp): fp32 with TF32 matrix products on compute capability {major}.{minor}",
        )
    if name != "auto":
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], f"{name} (--amp)"
    if device.type == "cuda":
        if major >= 8:
            return torch.bfloat16, f"bf16: compute capability {major}.{minor} runs it natively"
        return torch.float16, f"fp16 with a grad scaler: compute capability {major}.{minor}"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if device.type == "cpu" and (" avx512_bf16" in flags or " amx_bf16" in flags):
        return torch.bfloat16, "bf16: this CPU has AVX-512 BF16 or AMX"
    return None, f"off: no fast half precision on {device.type} here"


def check_image_size(model: nn.Module, image_size: int, arch: str, device, batch_size=2) -> None:
    """Fail early, in one line, when --image-size (or a batch of one) does not fit the network."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_size < 2 and any(m.weight is None or m.weight.requires_grad for m in bns):
        problem = f"{arch}'s batch norm needs 2 or more images per batch (frozen layers aside)"
        raise UserError(f"--batch-size {batch_size}: {problem}; pass -b 2 or more")
    try:
        probe = torch.zeros(2, 3, image_size, image_size, device=device)
        with torch.no_grad():
            model.eval()(probe)
            if not bns:  # train mode runs extra heads (GoogLeNet's); BN statistics must not move
                model.train()(probe)
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or type(e).__name__ == "AcceleratorError":
            raise  # the GPU's own trouble, not the image size
        problem = "needs more memory than there is" if "alloc" in str(e) else f"does not fit {arch}"
        raise UserError(f"--image-size {image_size} {problem} ({e})".split("\n")[0]) from e
    finally:
        model.train()


# Photos, the cache and seeded sampling

# What counts as a photo in a folder: what torchvision's ImageFolder reads, and GIFs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def is_photo(path: str | Path) -> bool:
    """A file with a photo's suffix whose name is not hidden (macOS's ._ files, say)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def find_photos(folder: Path) -> list[Path]:
    """The photos in folder and its sub-folders, sorted: the one rule of train.py, --eval,
    predict.py and split_data.py. Hidden files and folders are skipped (.ipynb_checkpoints/),
    a link to a photo is a photo, a link to a folder is not followed (`roses/up -> ..` would
    read every class as roses), and what is not a file (a FIFO, a dangling link) is no photo."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, f) for f in files if is_photo(f) and os.path.isfile(Path(parent, f))]
    return sorted(found)


class PhotoFolder(ImageFolder):
    """ImageFolder (one class per sub-folder), its photos found by find_photos."""

    def find_classes(self, directory) -> tuple[list[str], dict[str, int]]:
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
        if not folders:
            raise FileNotFoundError(f"no class sub-folders in {directory}")
        return folders, {name: i for i, name in enumerate(folders)}

    @staticmethod
    def make_dataset(
        directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        found = {name: find_photos(Path(directory, name)) for name in class_to_idx}
        empty = [name for name, photos in found.items() if not photos]
        if empty and not allow_empty:
            raise FileNotFoundError(f"no photos in the class folder(s) {', '.join(empty)}")
        return [(str(p), class_to_idx[name]) for name, photos in found.items() for p in photos]


MAX_ASPECT = 100  # longer side / shorter side: a 1 x 300,000 strip would be resized to gigabytes


def open_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Any image as users have it, upright RGB (or a ValueError with a short reason); with draft,
    a JPEG is decoded at 1/2 to 1/8 scale, both sides still at least draft pixels."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if max(img.size) > MAX_ASPECT * min(img.size):
                    raise ValueError(f"{img.width} x {img.height} pixels: too thin to be a photo")
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
    except (OSError, SyntaxError, EOFError) as e:  # gone, damaged, truncated, or not readable
        raise ValueError(f"cannot be read or decoded ({getattr(e, 'strerror', None) or e})") from e
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")  # 16-bit to 8-bit
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def image_folder(folder: Path, transform, draft: int) -> PhotoFolder:
    """A PhotoFolder of folder's class folders, its photos opened by open_rgb at draft."""
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found: run `python split_data.py` first")
    try:
        return PhotoFolder(folder, transform, loader=partial(load_image, draft=draft))
    except OSError as e:  # no class folders, or a class without photos
        raise UserError(f"{folder}: {e}; run `python split_data.py` to make the split") from e


def check_split(root: Path, train_set: PhotoFolder, val_set: PhotoFolder) -> None:
    """Refuse a split that shares a photo between train/ and val/ (val would score photos the
    network trained on), or that its split.json, if split_data.py wrote one, does not describe."""
    subsets = {"train": train_set, "val": val_set}
    found = {
        sub: {Path(p).relative_to(root / sub) for p, _ in subsets[sub].samples} for sub in subsets
    }
    same = found["train"] & found["val"]  # the same name: the same bytes too?
    if both := sorted(p for p in same if filecmp.cmp(root / "train" / p, root / "val" / p, False)):
        raise UserError(
            f"{root}: {len(both)} photo(s) in both train/ and val/, such as {both[0]}; keep "
            f"each in one of them, or run `python split_data.py` again"
        )
    try:
        described = json.loads((root / "split.json").read_text())["classes"]
        described = {(c, sub): n[sub] for c, n in described.items() for sub in subsets}
    except FileNotFoundError:  # a split made by hand
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        described = {}
    if Counter((p.parts[0], sub) for sub in subsets for p in found[sub]) != described:
        raise UserError(
            f"{root}: train/ and val/ are not the split its split.json describes (half-written, "
            f"or changed since); run `python split_data.py` again, or delete split.json if you "
            f"changed the split on purpose"
        )


def load_image(path: str, draft: int | None = None) -> Image.Image:
    """open_rgb for the datasets: an unreadable image stops training with its name."""
    try:
        return open_rgb(Path(path), draft)
    except ValueError as e:
        raise UserError(f"cannot read image {path} ({e}); fix or remove it") from e


def cache(train_set, val_set, how: str, image_size: int, workers: int, run: Run):
    """The ImageFolders decoded once into RAM, if --cache says so: training keeps twice the crop
    size, validation the output of its first two steps (resize, crop): the same results."""
    need = (len(train_set) + len(val_set)) * 4 * (2 * image_size) ** 2 * run.local_world_size
    ram = memory_limit()  # auto: on when the decoded images (4:3 photos) take under 1/8 of it
    auto, limit = how == "auto", f"an eighth of the {ram / 2**20:.0f} MiB this process may use"
    how = ("on" if need < ram / 8 else "off") if auto else how
    if how == "off":
        if run.is_main and auto:
            print(f"photos decoded anew each epoch: cached, they would take over {limit}")
        return train_set, val_set

    def shrink(image: Image.Image) -> torch.Tensor:  # the shorter side at most twice the crop
        small = min(image.size) > 2 * image_size
        return TF.pil_to_tensor(TF.resize(image, 2 * image_size) if small else image)

    steps = val_set.transform.transforms
    try:
        train_set = CachedImages(train_set, shrink, train_set.transform, workers)
        prepare = T.Compose([*steps[:2], T.PILToTensor()])
        val_set = CachedImages(val_set, prepare, T.Compose(steps[2:]), workers)
    except MemoryError as e:
        raise UserError("--cache: the decoded images do not fit in memory; use --cache off") from e
    if run.is_main:
        size = f"{(train_set.nbytes + val_set.nbytes) / 2**20:.0f} MiB"
        print(f"decoded photos cached in RAM: {size}" + (f" (--cache auto: under {limit})" * auto))
    return train_set, val_set


def memory_limit() -> int:
    """The bytes this process may use: the RAM, or less under `ulimit -v` or a container's limit."""
    if os.name != "posix":
        return 0
    import resource

    cgroup = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: bytes, or "max"
    text = cgroup.read_text().strip() if cgroup.is_file() else "max"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [ram, int(text) if text.isdigit() else 0, resource.getrlimit(resource.RLIMIT_AS)[0]]
    return min(n for n in limits if n > 0)  # an unlimited `ulimit -v` is -1


class CachedImages(Dataset):
    """A dataset decoded once into memory as uint8 tensors: prepare runs once per image
    (decode, shrink), transform at every access."""

    def __init__(self, folder: ImageFolder, prepare, transform, workers: int) -> None:
        self.targets, self.transform = folder.targets, transform
        with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow releases the GIL
            decoded = pool.map(lambda sample: prepare(folder.loader(sample[0])), folder.samples)
            self.images = list(tqdm(decoded, total=len(folder), desc="caching", leave=False))
        self.nbytes = sum(image.numel() for image in self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.targets[index]


def seed_for(*numbers: int) -> int:
    """A seed made from numbers, the same on every machine and Python version."""
    return random.Random(",".join(map(str, numbers))).getrandbits(48)


class EpochSampler(DistributedSampler):
    """This process's share of a seeded shuffle, as (epoch, index) keys for SeededSamples."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


class SeededSamples(Dataset):
    """Draws each sample's augmentation from its own seed (seed, epoch, index), whichever
    process or loader worker takes it: a resumed or a distributed run sees the same images."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # The CPU generator alone (torch.manual_seed would seed every GPU too: 50x slower).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_for(self.seed, epoch, index))
            return self.dataset[index]


# Files: atomic writes, checkpoints, the output folder


class _File(io.FileIO):
    """A file that keeps the OSError of a failed write: torch.save reports it as RuntimeError."""

    error: OSError | None = None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as e:
            self.error = e
            raise


def write_file(path: Path, write) -> None:
    """Fill path atomically: write(f) fills a temporary file beside it, then a rename. If
    anything goes wrong (a full disk, Ctrl-C), path keeps its content, and no temporary stays."""
    tmp, f = path.with_name(f".{path.name}.{os.getpid()}.tmp"), None  # one per process
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _File(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write, or Ctrl-C while writing, as a RuntimeError.
        cause = e if isinstance(e, OSError) else getattr(f, "error", None) or e.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"cannot write {path} ({cause.strerror or cause})") from e
    finally:
        remove_quietly(tmp)  # on a read-only disk: the error to tell is the one above


def save_figure(fig: Figure, path: Path) -> None:
    write_file(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower(), dpi=100))


def load_checkpoint(path: Path, family: str) -> dict:
    """A checkpoint of this family's train.py (weights_only: nothing arbitrary is unpickled)."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would never end
        raise UserError(f"{path} is not a checkpoint (not a file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # none there, a folder, no permission
        raise UserError(f"cannot read checkpoint {path} ({e.strerror or e})") from e
    except Exception as e:  # weights_only refuses anything but plain data, with varied errors
        what = "damaged, truncated, or holding more than tensors and plain values"
        raise UserError(f"{path} is not a checkpoint ({what})") from e
    keys = {"model", "family", "arch", "classes", "image_size", "mean", "std"}
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict) or not keys <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint written by a train.py of this project")
    if checkpoint["family"] != family:
        theirs = f"{checkpoint['arch']} of the {checkpoint['family']} folder"
        raise UserError(
            f"{path} holds {theirs}, not a {family} network; use {checkpoint['family']}/"
        )
    size, classes = checkpoint["image_size"], checkpoint["classes"]
    if type(size) is not int or not 0 < size <= 4096:  # (True is an int too)
        raise UserError(f"{path}: its image_size {size!r} is not a size from 1 to 4096")
    if not (isinstance(classes, list) and classes and all(type(c) is str for c in classes)):
        raise UserError(f"{path}: its classes are not a list of names")
    for v in (checkpoint["mean"], checkpoint["std"]):
        if not (isinstance(v, list) and len(v) == 3 and all(type(x) is float and x for x in v)):
            raise UserError(f"{path}: its mean and std are not three numbers each")
    checkpoint["classes"] = [printable(name) for name in classes]
    if not all(t.isfinite().all() for t in model.values() if isinstance(t, torch.Tensor)):
        raise UserError(f"{path} holds NaN or infinite weights: the run that wrote it diverged")
    return checkpoint


def printable(name: str) -> str:
    """name with its control characters escaped: a class name in a checkpoint cannot recolour
    the terminal (ANSI codes) or forge a result line (a newline)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)


def check_apart(output: Path, flag: str, inputs) -> None:
    """Refuse, before any work, an output that is, lies inside or holds a path the run reads
    (links resolved): it would overwrite that path, or add files that the next run reads."""
    output = output.expanduser().resolve()
    for path in (Path(p).expanduser().resolve() for p in inputs):
        inside, holds = output.is_relative_to(path), path.is_relative_to(output)
        where = "would overwrite" if output == path else "is inside" if inside else "contains"
        if inside or holds:
            raise UserError(f"{flag} {output} {where} {path}, which the run reads; write elsewhere")


def prepare_output_dir(output_dir: Path) -> None:
    """Create --output-dir and hold it while the run lives, before any time is spent: its .lock
    names this process (removed at exit), so a second run into the folder is refused."""
    lock = output_dir / ".lock"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(lock) and not lock.is_file() or lock.is_symlink():
            raise UserError(f"{lock} is not a lock file of train.py; remove it and run again")
        if lock.is_file():
            pid = lock.read_text().strip()
            young = time.time() - lock.stat().st_mtime < 10  # an empty one: its number comes next
            if not (running(pid) if pid else young):
                lock.unlink()  # left by a run that was killed
        with open(lock, "x") as f:  # exclusive: of two runs starting together, one gets it
            f.write(str(os.getpid()))
        for tmp in output_dir.glob(".*.*.tmp"):  # write_file's, left by killed processes
            if not running(tmp.name.split(".")[-2]):
                tmp.unlink(missing_ok=True)
    except OSError as e:
        if isinstance(e, FileExistsError) and lock.is_file():  # another run holds the folder
            pid = printable(lock.read_text().strip()[:10])
            holder = f"another run (process {pid}) writes to {output_dir}"
            raise UserError(f"{holder}; wait for it, or delete {lock.name} if none runs") from None
        problem = "is a file" if output_dir.is_file() else f"cannot be written ({e.strerror or e})"
        raise UserError(f"--output-dir {output_dir} {problem}; pass a folder you can write") from e
    atexit.register(remove_quietly, lock)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone, or on a read-only disk: nothing to add
        path.unlink(missing_ok=True)


class EpochMeter:
    """The bookkeeping of a training epoch, apart from its lesson: the progress bar, the time
    spent waiting for the data loader, the running sums of loss and accuracy (kept on the
    device: each read waits for a GPU), the GPU's peak memory, and on the CPU one note when the
    run ahead is long."""

    def __init__(self, epoch: int, epochs: int, batches: int, run: Run, quicker: dict) -> None:
        self.epoch, self.epochs, self.batches, self.run = epoch, epochs, batches, run
        self.quicker, self.note_due = quicker, epoch == 1 and run.device.type == "cpu"
        self.sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # images, loss, right
        self.bar = tqdm(
            total=batches, desc=f"epoch {epoch} train", leave=False, disable=not run.is_main
        )
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        self.waited, self.start = 0.0, time.perf_counter()

    def wrap(self, iterable):
        """Yields iterable's items, timing the waits for them (what the model did not use)."""
        ready = self.start
        for batch, item in enumerate(iterable, 1):
            self.waited += time.perf_counter() - ready
            yield item
            self.bar.update()
            if batch == 1 and self.batches > 1 and self.run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.run.device)  # cuDNN's trials are done
            self.note_a_long_run(batch)
            ready = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.sums[0] += targets.size(0)
        self.sums[1] += loss.detach().double() * targets.size(0)
        self.sums[2] += (logits.argmax(1) == targets).sum()

    def note_a_long_run(self, batch: int) -> None:
        """On the CPU, once, from the first batches (10 s or 4): will the run take over 15 min?
        (VGG16 on the sample: about 25 min on 2 cores with bf16; a quick-start command: < 30 s)"""
        elapsed = time.perf_counter() - self.start
        if self.note_due and (elapsed >= 10 or batch == 4):
            self.note_due, minutes = False, elapsed / batch * self.batches * self.epochs / 60
            total = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.0f} h"
            if minutes > 15 and self.run.is_main:
                per_epoch = f"{minutes / self.epochs:.0f} min per epoch, from its first batches"
                quicker = f"a quicker first run: {command_with(self.quicker)}"
                tqdm.write(
                    f"note: on the CPU this run takes about {total} ({per_epoch}); {quicker}"
                )

    def row(self, lr: float) -> dict:
        """The epoch's loss, accuracy and speed, summed over every process."""
        self.bar.close()
        if self.run.distributed:
            dist.all_reduce(self.sums)
        seen, loss_sum, correct = self.sums.tolist()  # waits for the GPU's queued work
        seconds = time.perf_counter() - self.start  # so the clock is read after it
        if not math.isfinite(loss_sum):  # judged on the totals: every process stops alike
            problem = f"loss became {loss_sum / seen} in epoch {self.epoch}: training diverged"
            raise UserError(f"{problem}; try a lower --lr (now {lr:g})")
        row = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "seconds": seconds}
        row |= {"img_s": seen / seconds, "data_wait": self.waited / seconds}
        if self.run.device.type == "cuda":  # the most this epoch's tensors took on this GPU
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.run.device) / 2**30
        return row


def running(pid: str) -> bool:
    """Whether another process pid runs (where that cannot be told, as on Windows: True)."""
    try:
        if int(pid) <= 0:  # os.kill would signal a process group
            return False
        os.kill(int(pid), 0) if os.name == "posix" else None  # signal 0: only a check
        return int(pid) != os.getpid()
    except ProcessLookupError:  # no such process
        return False
    except (ValueError, PermissionError):  # no number yet (being written); another user's
        return True


# Reports and figures


def log_epoch(history: list[dict], epochs: int, output_dir: Path) -> None:
    """Print the epoch's line, rewrite metrics.csv and redraw curves.png."""
    row = history[-1]
    print(
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.3f}  "
        f"train_acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.3f}  "
        f"val_acc {row['val_acc']:.3f}  lr {row['lr']:.1e}  {row['seconds']:.0f}s  "
        f"{row['img_s']:.0f} img/s  data_wait {row['data_wait']:.0%}"
        + (f"  gpu_mem {row['gpu_mem_gib']:.2f} GiB" if "gpu_mem_gib" in row else "")
    )
    lines = [",".join(row)] + [",".join(f"{r.get(c, math.nan):.6g}" for c in row) for r in history]
    write_file(output_dir / "metrics.csv", lambda f: f.write("\n".join(lines + [""]).encode()))
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, key in zip(fig.subplots(1, 2), ["loss", "acc"], strict=True):
        metric = "accuracy" if key == "acc" else "loss"
        for split in ("train", "val"):
            values = [r[f"{split}_{key}"] for r in history]
            ax.plot([r["epoch"] for r in history], values, "o-", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=metric, ylim=(0, 1) if key == "acc" else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, output_dir / "curves.png")


def kept(saved: int, output_dir: Path) -> str:
    """What a run that stops now leaves, and how to go on from it."""
    last = output_dir / "last.pth"
    if not saved:
        return "no epoch was saved yet"
    return f"{last} holds epoch {saved}; continue with: {command_with({'--resume': str(last)})}"


def report_end(history: list[dict], epochs: int, seconds: float, output_dir: Path) -> None:
    best = max(history, key=lambda row: row["val_acc"])  # the earliest of ties
    note = f"best.pth keeps the last epoch; {seconds / 60:.1f} min; outputs in {output_dir}"
    print(f"best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}/{epochs}; {note}")


def use_fonts_for(texts: list[str]) -> None:
    """Let matplotlib draw class names in any script: DejaVu Sans, then the installed ones of
    these CJK fonts; where none is installed, one note instead of a warning per character."""
    from matplotlib import font_manager, rcParams

    cjk = "Noto Sans CJK SC, Noto Sans CJK JP, Source Han Sans SC, WenQuanYi Zen Hei, Microsoft "
    cjk += "YaHei, PingFang SC, Hiragino Sans GB, SimHei, Arial Unicode MS"
    installed = {font.name for font in font_manager.fontManager.ttflist}
    family = ["DejaVu Sans", *[name for name in cjk.split(", ") if name in installed]]
    first = rcParams["font.family"] != family  # the note once, not for every figure
    rcParams["font.family"] = family
    beyond = sorted({c for text in texts for c in text if ord(c) >= 0x2E80})  # CJK and after
    if beyond and len(family) == 1 and first:
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        missing = f"no installed font has the characters {''.join(beyond)[:20]}"
        print(f"note: {missing}; the figures show boxes (install Noto Sans CJK)", file=sys.stderr)


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str) -> Figure:
    """The confusion matrix (rows: true class) with counts, shaded by each row's share."""
    use_fonts_for(classes)
    k = len(classes)
    fig = Figure(figsize=(0.8 * k + 3, 0.8 * k + 2), layout="constrained")
    ax = fig.subplots()
    rows = matrix.sum(1, keepdim=True).clamp(min=1)
    ax.imshow((matrix / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if matrix[i, j] > 0.5 * rows[i] else "black"
            ax.text(j, i, str(matrix[i, j].item()), ha="center", va="center", color=colour)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


# The command: its flags, its line, one-line errors, Ctrl-C


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a flag without a default says what it does itself
        return action.help if action.default is None else super()._get_help_string(action)


def script_parser(doc: str, prog: str) -> argparse.ArgumentParser:
    """A parser whose help shows the script's docstring and every flag's default."""
    text, epilog = doc.split("\n\n", 1)
    return argparse.ArgumentParser(prog, None, text, epilog, formatter_class=HelpFormatter)


def number(kind: type, low: float, high: float = math.inf, low_in=True, high_in=True):
    """An argparse type: a kind (int or float) from low to high, the ends included or not."""

    def parse(text: str):
        value = kind(text)
        if not (low <= value <= high and (low_in or value > low) and (high_in or value < high)):
            ends = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise argparse.ArgumentTypeError(f"{text} is not in {ends}")
        return value

    parse.__name__ = kind.__name__  # argparse's message for a non-number: "invalid int value"
    return parse


def user_path(text: str) -> Path:
    """An argparse type: a path (~ expanded), refused at once if it runs into a link loop."""
    path = Path(text).expanduser()
    try:
        path.resolve()  # before Python 3.13: RuntimeError("Symlink loop from ...")
    except (RuntimeError, OSError) as e:
        raise argparse.ArgumentTypeError(f"{text} is a loop of symbolic links; fix it") from e
    return path


SHORT = {"--batch-size": ("-b",), "--workers": ("-j",)}  # the short names of train.py's flags


def command_with(changes: dict[str, str]) -> str:
    """This run's command line with the flags in changes set to their values: a flag given
    already (as --flag VALUE, --flag=VALUE, or -b for --batch-size) loses its old value."""
    launcher = ["python"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun: restart the same way
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}"]
    names = {name for flag in changes for name in (flag, *SHORT.get(flag, ()))}
    argv, kept = sys.argv[1:], []
    for i, part in enumerate(argv):
        flag = part.split("=", 1)[0] if part.startswith("-") else None
        value_of_a_changed_flag = flag is None and i > 0 and argv[i - 1] in names
        if flag not in names and not value_of_a_changed_flag:
            kept.append(part)
    changed = [part for flag, value in changes.items() for part in (flag, value)]
    return shlex.join([*launcher, sys.argv[0], *kept, *changed])


def exit_interrupted(message: str = "") -> NoReturn:
    """Say message, exit with 130 (Ctrl-C's code), no traceback from a cleanup cut short."""
    print(message, file=sys.stderr, end="\n" if message else "")
    sys.unraisablehook = lambda unraisable: None
    sys.exit(130)


def run_command(main, parser: argparse.ArgumentParser, out_of_memory=None) -> NoReturn:
    """Run main(args) as a command: a UserError is one line, Ctrl-C (or SIGTERM) exits 130,
    and out_of_memory(args), if given, says what to do when the GPU's memory runs out."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # both raise KeyboardInterrupt from here
        signal.signal(signum, signal.default_int_handler)
    args, name = parser.parse_args(), parser.prog
    rank = f"[rank {os.environ['RANK']}] " if "WORLD_SIZE" in os.environ else ""
    try:
        sys.exit(main(args))
    except UserError as e:
        # Raised in a DataLoader worker, the message is the worker's traceback, ours at its end.
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        sys.exit(f"{rank}{name}: error: {message}")
    except KeyboardInterrupt:  # the epoch loop reports its own, then exits
        exit_interrupted(f"\n{name}: interrupted")
    except torch.cuda.OutOfMemoryError:
        if out_of_memory is None:
            raise
        sys.exit(f"{rank}{name}: error: {out_of_memory(args)}")
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
