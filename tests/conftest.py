"""Helpers shared by the tests: where things are, small generated images, loading by path."""

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "flower_photos_sample"
FAMILIES = ("lenet", "alexnet", "vgg", "googlenet", "resnet")

# Small inputs that every network still accepts, so that a CPU epoch takes seconds.
SMALL = {
    "lenet": ["--image-size", "32"],
    "alexnet": ["--image-size", "64"],
    "vgg": ["--arch", "vgg11_bn", "--image-size", "32"],
    "googlenet": ["--image-size", "96"],
    "resnet": ["--arch", "resnet18", "--image-size", "64"],
}

needs_sample = pytest.mark.skipif(
    not SAMPLE.is_dir(),
    reason=f"the real flower sample is not at {SAMPLE} (../shared is absent on this machine)",
)


@pytest.fixture(scope="session")
def flowers(tmp_path_factory) -> Path:
    """The real sample, split by split_data.py as a user would: 27 train / 3 val per class."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the real flower sample is not at {SAMPLE} (../shared is absent)")
    out = tmp_path_factory.mktemp("data") / "flower_data"
    result = run_script(REPO / "split_data.py", "--source", SAMPLE, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A generated split with 3 classes, for the error paths."""
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(("a", "b", "c")):
            folder = tmp_path / "tiny" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(c * 50 + i, size=(80, 72)))
    return tmp_path / "tiny"


def load_module(path: Path, name: str | None = None):
    """Import a file by path: five folders share each file name, so plain imports collide."""
    name = name or f"{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(family: str, script: str):
    """Import a folder's train.py or predict.py, with that folder's model.py as `model`."""
    model = load_module(REPO / family / "model.py", f"{family}_model")
    saved = sys.modules.get("model")
    sys.modules["model"] = model
    try:
        return load_module(REPO / family / f"{script}.py", f"{family}_{script}")
    finally:
        if saved is None:
            del sys.modules["model"]
        else:
            sys.modules["model"] = saved


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
