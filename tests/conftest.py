"""Helpers shared by the tests: where things are, small generated images, loading by path."""

import contextlib
import functools
import importlib.util
import io
import os
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.cuda._utils import _get_device_index

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("lenet", "alexnet", "vgg", "googlenet", "resnet")

# The suite leaves the checkout as it found it: no bytecode beside the files it imports or
# starts (here and in every process it starts), no .pytest_cache (pyproject.toml's addopts).
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


def forget_own_bytecode(cache: Path = Path(__file__).parent / "__pycache__") -> None:
    """pytest writes this file's bytecode before it runs it, so before the line above: remove
    tests/__pycache__ when it holds only that file, written this minute (by this session)."""
    files = list(cache.iterdir()) if cache.is_dir() else []
    fresh = [
        f for f in files if f.name.startswith("conftest.") and f.stat().st_mtime > time.time() - 60
    ]
    if files and fresh == files:
        shutil.rmtree(cache, ignore_errors=True)


forget_own_bytecode()


def checkout_state() -> tuple[str, set]:
    """What the suite must leave as it found it: git's view of the checkout, ignored files
    included, and every path of data/ and the run folders with its time (git shows no folder
    without files, nor a file rewritten with the same content)."""
    git = ["git", "-C", str(REPO), "status", "--porcelain", "--ignored"]
    status = (
        subprocess.run(git, capture_output=True, text=True).stdout if shutil.which("git") else ""
    )
    folders = [REPO / "data", *(REPO / family / "runs" for family in FAMILIES)]
    return status, {(str(p), p.lstat().st_mtime_ns) for d in folders for p in d.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """Fails the session when a test wrote into the checkout (a user's runs/, data/...)."""
    before = checkout_state()
    yield
    after = checkout_state()
    if after != before:
        lines = set(after[0].splitlines()) ^ set(before[0].splitlines())
        changed = sorted(lines | {path for path, _ in after[1] ^ before[1]})
        pytest.fail(f"the suite changed the checkout: {', '.join(changed[:5])}", pytrace=False)


SAMPLE = REPO / "data" / "flower_sample"  # the project's own photos: 30 per class

# Small inputs that every network still accepts, so that a CPU epoch takes seconds.
SMALL = {
    "lenet": ["--image-size", "32"],
    "alexnet": ["--image-size", "64"],
    "vgg": ["--arch", "vgg11_bn", "--image-size", "32"],
    "googlenet": ["--image-size", "96"],
    "resnet": ["--arch", "resnet18", "--image-size", "64"],
}


@pytest.fixture(scope="session")
def flowers(tmp_path_factory) -> Path:
    """The real sample, split by split_data.py as a user would: 27 train / 3 val per class."""
    out = tmp_path_factory.mktemp("data") / "flower_data"
    result = run_script(REPO / "split_data.py", "--source", SAMPLE, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def make_tiny(root: Path) -> Path:
    """A generated split with 3 classes (a, b, c): 6 train and 2 val photos each, all apart."""
    for split, n, first in (("train", 6, 0), ("val", 2, 6)):
        for c, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(c * 50 + first + i, size=(80, 72)))
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A generated split with 3 classes, for the error paths; the test may change it."""
    return make_tiny(tmp_path / "tiny")


# One epoch of LeNet on tiny, 32 x 32 pixels, on the CPU.
LENET = ["--epochs", "1", "-b", "4", "--image-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """best.pth of LeNet trained one epoch on a tiny split of its own (classes a, b, c), for the
    tests that need a checkpoint, not a good one. Shared: copy it before changing anything."""
    root = tmp_path_factory.mktemp("tiny_run")
    out = root / "run"
    result = run_script(
        REPO / "lenet" / "train.py",
        "--data-path",
        make_tiny(root / "tiny"),
        "--output-dir",
        out,
        *LENET,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "best.pth"


# Epochs of the one training per family on the sample that several tests share: two for LeNet
# (no batch norm) and ResNet (batch norm), one for the larger networks (VGG's last.pth alone is
# 1.5 GiB).
SAMPLE_EPOCHS = {"lenet": 2, "alexnet": 1, "vgg": 1, "googlenet": 1, "resnet": 2}


@pytest.fixture(scope="session")
def sample_runs(flowers, tmp_path_factory) -> dict:
    """Each family's train.py on the real sample, SMALL sizes: family -> (result, output dir).
    Shared by the end-to-end tests and the predict.py tests: do not write into these folders.
    Two at a time, a thread each: the start-up and data loading of one overlap the other's
    steps (on 2 cores: 51 s one after the other, 29 s this way)."""
    runs, env = {}, {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(2) as pool:
        for family in FAMILIES:
            out = tmp_path_factory.mktemp(f"run_{family}")
            argv = ["--data-path", flowers, "--epochs", SAMPLE_EPOCHS[family], "--output-dir", out]
            script = REPO / family / "train.py"
            runs[family] = (pool.submit(run_script, script, *argv, *SMALL[family], env=env), out)
    return {family: (started.result(), out) for family, (started, out) in runs.items()}


def load_module(path: Path, name: str | None = None):
    """Import a file by path: five folders share each file name, so plain imports collide."""
    name = name or f"{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(family: str, script: str):
    """Import a folder's train.py, predict.py or utils.py, with that folder's model.py, utils.py
    (and, for predict.py, train.py) as the modules it imports."""
    names = ["model", "utils", "train"][: ["model", "utils", "train", "predict"].index(script)]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name in names:
            sys.modules[name] = load_module(REPO / family / f"{name}.py", f"{family}_{name}")
        return load_module(REPO / family / f"{script}.py", f"{family}_{script}")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def val_accuracy_of(family: str, checkpoint: Path, data_path: Path, *flags) -> float:
    """The val accuracy of a checkpoint, computed here with train.py's own evaluate(), one
    process, the precision --amp auto picks: what the run logged for its last epoch."""
    train_py = load_script(family, "train")
    argv = ["--data-path", data_path, "--workers", "0", "--cache", "off", *flags]
    args = train_py.get_args_parser().parse_args(list(map(str, argv)))
    cpu = torch.device("cpu")
    run = train_py.utils.Run(cpu, *train_py.utils.pick_amp("auto", cpu))
    _, val_set, classes = train_py.load_datasets(args, run, 0)
    model = train_py.build_model(args, len(classes))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size)
    return train_py.evaluate(model, torch.nn.CrossEntropyLoss(), loader, args, run)["acc"]


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    """A small, valid JPEG whose colour depends on seed."""
    colour = tuple((seed * k) % 256 for k in (37, 91, 151))
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class: int = 10) -> Path:
    """A folder of class sub-folders holding generated JPEGs."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"img_{i:03d}.jpg").write_bytes(jpeg_bytes(c * 100 + i))
    return root


def run_script(script: Path, *args, cwd: Path | None = None, timeout: float = 600, env=None):
    """Run a script as a user would (own process, no display), capturing its output."""
    full_env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("DISPLAY", None)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd or script.parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@functools.cache
def model_py_output(family: str, *args: str) -> subprocess.CompletedProcess:
    """What `python <family>/model.py ARGS` prints and its exit code, run once per session in
    this process (model.py imports only torch: no interpreter to start for it)."""
    script, out, err, code = REPO / family / "model.py", io.StringIO(), io.StringIO(), 0
    argv, sys.argv = sys.argv, [str(script), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # sys.exit("message"): Python prints it and exits with 1
        code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
        err.write("" if isinstance(stop.code, int) or stop.code is None else f"{stop.code}\n")
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code or 0, out.getvalue(), err.getvalue())


def texts_outside(fig) -> list[str]:
    """The titles and axis labels of fig, drawn as saved, that reach past its edges."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = [*fig.texts, *([fig._suptitle] if fig._suptitle else [])]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    edges, outside = fig.bbox.padded(0.5), []  # half a pixel: rounding
    for text in (t for t in texts if t.get_visible() and t.get_text().strip()):
        box = text.get_window_extent(canvas.get_renderer())
        if not (edges.contains(*box.min) and edges.contains(*box.max)):
            outside.append(text.get_text())
    return outside


def answer(value):
    """A function that returns value, and says it wraps itself: torch._dynamo, once imported,
    reads torch.backends.mps.is_available.__wrapped__."""

    def function():
        return value

    function.__wrapped__ = function
    return function


class ReachedGPU(Exception):
    """The fake GPU's answer to the first real CUDA work: start-up got that far unrefused."""


@dataclass
class FakeGPU:
    """What the fake_gpu fixture reports, and what the code asked of it."""

    capability: tuple[int, int] = (8, 6)
    archs: list[str] = field(
        default_factory=lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    )
    count: int = 1
    total_memory: int = 8 * 2**30
    current: int = 0
    calls: list[tuple] = field(default_factory=list)  # (function, device index)


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGPU:
    """torch reports CUDA GPUs of gpu.capability for a build of gpu.archs, and every CUDA call
    the scripts make goes through torch's own argument checks (_get_device_index, as the real
    functions call it), so what torch would refuse fails here too. The first real CUDA work
    (torch's lazy CUDA start, which every tensor placed on a GPU calls) raises ReachedGPU.
    """
    gpu = FakeGPU()

    def index(name: str, device, optional: bool = True) -> int:
        i = _get_device_index(device, optional=optional)  # torch's check, strict or optional
        if not 0 <= i < gpu.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({name}({device!r}))")
        gpu.calls.append((name, i))
        return i

    def properties(device=None):
        i = index("get_device_properties", device)
        name = f"Fake GPU {i}"
        return type(
            "Properties",
            (),
            {
                "name": name,
                "major": gpu.capability[0],
                "minor": gpu.capability[1],
                "total_memory": gpu.total_memory,
            },
        )()

    def set_device(device) -> None:
        if (i := _get_device_index(device)) >= 0:  # as torch.cuda.set_device: no index, no run
            gpu.current = index("set_device", i)

    def set_per_process_memory_fraction(fraction, device=None) -> None:
        device = gpu.current if device is None else device
        index("set_per_process_memory_fraction", device, optional=False)
        if not isinstance(fraction, float) or not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")

    def mem_get_info(device=None) -> tuple[int, int]:
        index("mem_get_info", gpu.current if device is None else device)
        return gpu.total_memory // 2, gpu.total_memory

    def counter(name: str):
        return lambda device=None: index(name, device) * 0

    def init_process_group(backend: str, *args, **kwargs) -> None:
        local_rank = int(os.environ["LOCAL_RANK"])
        if backend == "nccl" and gpu.current != local_rank:  # NCCL works on the current GPU
            raise RuntimeError(f"NCCL on GPU {gpu.current}, LOCAL_RANK is {local_rank}")
        gpu.calls.append(("init_process_group", backend))

    def lazy_init() -> None:
        raise ReachedGPU("the first CUDA work")

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: gpu.count)
    monkeypatch.setattr(cuda, "current_device", lambda: gpu.current)
    monkeypatch.setattr(cuda, "get_arch_list", lambda: gpu.archs)
    monkeypatch.setattr(cuda, "get_device_properties", properties)
    monkeypatch.setattr(
        cuda,
        "get_device_capability",
        lambda d=None: gpu.capability if index("get_device_capability", d) >= 0 else None,
    )
    monkeypatch.setattr(cuda, "get_device_name", lambda d=None: properties(d).name)
    monkeypatch.setattr(cuda, "set_device", set_device)
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", set_per_process_memory_fraction)
    monkeypatch.setattr(cuda, "mem_get_info", mem_get_info)
    for name in (
        "reset_peak_memory_stats",
        "max_memory_allocated",
        "max_memory_reserved",
        "memory_reserved",
        "synchronize",
        "empty_cache",
    ):
        monkeypatch.setattr(cuda, name, counter(name))
    monkeypatch.setattr(cuda, "_lazy_init", lazy_init)
    monkeypatch.setattr(torch.backends.mps, "is_available", answer(False))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    return gpu
