"""predict.py in every folder: right answers, every image kind, bad input, safe loading."""

import argparse
import functools
import io
import json
import os
import struct
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.utils import make_grid

from conftest import (
    FAMILIES,
    REPO,
    jpeg_bytes,
    load_module,
    load_script,
    run_script,
    texts_outside,
)
from sync_shared import shared_definitions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def predict(family: str, *args, env=None):
    return run_script(REPO / family / "predict.py", *args, env=env)


@pytest.fixture(scope="session")
def checkpoints(sample_runs) -> dict[str, Path]:
    """best.pth of each family's shared training on the real sample."""
    for family, (result, _) in sample_runs.items():
        assert result.returncode == 0, f"{family}: {result.stderr[-3000:]}"
    return {family: out / "best.pth" for family, (_, out) in sample_runs.items()}


@functools.cache
def direct_network(family: str, weights: Path):
    """The checkpoint's network and preprocessing, built here without predict.py."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    model_py = load_module(REPO / family / "model.py", f"{family}_model_direct")
    n, state = len(checkpoint["classes"]), checkpoint["model"]
    if family == "googlenet":
        model = model_py.GoogLeNet(num_classes=n, aux_logits=False)
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    elif family in ("vgg", "resnet"):
        model = model_py.ARCHS[checkpoint["arch"]](num_classes=n)
    else:
        model = model_py.LeNet(num_classes=n) if family == "lenet" else model_py.AlexNet(n)
    model.load_state_dict(state, strict=True)
    size = checkpoint["image_size"]
    pipeline = T.Compose(
        [
            T.Resize(round(size / 0.875), antialias=True),
            T.CenterCrop(size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(checkpoint["mean"], checkpoint["std"]),
        ]
    )
    return model.eval(), pipeline, size


def direct_probabilities(family: str, weights: Path, image: Path) -> torch.Tensor:
    """What the checkpoint's network says of image, computed here without predict.py."""
    model, pipeline, size = direct_network(family, weights)
    with Image.open(image) as img:
        # JPEGs are decoded at the reduced scale that keeps twice the resize (as train.py does).
        img.draft("RGB", (2 * round(size / 0.875),) * 2)
        x = pipeline(img.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_on_val_images_match_a_direct_forward_pass(family, checkpoints, flowers):
    weights = checkpoints[family]
    result = predict(family, flowers / "val", "--weights", weights, "--json", "--topk", "9")
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(result.stdout)
    val_images = sorted(flowers.glob("val/*/*"))
    assert [Path(r["file"]) for r in records] == val_images
    for record in records:
        top = record["top"]
        assert len(top) == 5  # --topk 9 capped at the 5 classes
        probabilities = [entry["probability"] for entry in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert all(0 <= p <= 1 for p in probabilities)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    for record in records[:: max(1, len(records) // 4)]:
        direct = direct_probabilities(family, weights, Path(record["file"]))
        best = int(direct.argmax())
        assert record["top"][0]["class"] == checkpoint["classes"][best]
        assert record["top"][0]["probability"] == pytest.approx(direct[best].item(), abs=1e-4)


def test_human_output_lists_the_top_k_and_saves_a_figure_headless(checkpoints, flowers, tmp_path):
    image = sorted(flowers.glob("val/roses/*"))[0]
    env = {"MPLBACKEND": ""}  # no backend forced: matplotlib must fall back by itself
    result = predict("resnet", image, "--weights", checkpoints["resnet"], "--topk", "3", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    named, top = lines[0].split(": ")
    assert named == str(image) and len(top.split(", ")) == 3  # --topk 3, in one line
    assert [float(entry.split()[1]) for entry in top.split(", ")] == sorted(
        (float(entry.split()[1]) for entry in top.split(", ")), reverse=True
    )
    figure = checkpoints["resnet"].parent / f"prediction_{image.stem}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1] == f"figure saved to {figure}"

    grid = tmp_path / "grid.png"
    several = predict("lenet", flowers / "val", "--weights", checkpoints["lenet"], "--save", grid)
    assert several.returncode == 0, several.stderr[-3000:]
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_title_of_every_figure_lies_inside_it(checkpoints, flowers, tmp_path, monkeypatch):
    """Each figure the scripts save, drawn as saved: one photo, two, a row and a half, a full
    grid under its heading, with and without Grad-CAM, --eval's two, and the training curves."""
    predict_py = load_script("lenet", "predict")
    figures = []
    monkeypatch.setattr(predict_py.utils, "save_figure", lambda fig, path: figures.append(fig))
    photos = [str(p) for p in sorted(flowers.glob("train/*/*.jpg"))]
    weights = ["--weights", str(checkpoints["lenet"]), "--save", str(tmp_path / "f.png"), "--json"]
    for n in (1, 2, 7, 26):
        for cam in ([], ["--cam"]):
            predict_py.main(predict_py.get_args_parser().parse_args([*photos[:n], *weights, *cam]))
    evaluation = [str(flowers / "val"), "--eval", *weights[:2], "--save", str(tmp_path / "e")]
    predict_py.main(predict_py.get_args_parser().parse_args([*evaluation, "--json"]))
    history = [
        {"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.1, "val_acc": 0.4}
        | {"lr": 1e-3, "seconds": 1.0, "img_s": 9.0, "data_wait": 0.1}
        for e in (1, 2)
    ]
    predict_py.utils.log_epoch(history, 2, tmp_path)
    assert len(figures) == 11
    for fig in figures:
        assert not texts_outside(fig), (fig.get_size_inches(), texts_outside(fig))


def test_a_missing_checkpoint_names_those_trained_in_the_folder(
    checkpoints, flowers, tmp_path, monkeypatch
):
    predict_py = load_script("resnet", "predict")
    monkeypatch.setattr(predict_py, "FOLDER", tmp_path)  # resnet/ as a user's copy has it
    photo = str(sorted(flowers.glob("val/roses/*"))[0])

    def refusal(*argv) -> str:
        with pytest.raises(predict_py.UserError) as error:
            predict_py.main(predict_py.get_args_parser().parse_args([photo, *argv]))
        return str(error.value)

    assert "train one with `python resnet/train.py`" in refusal()  # nothing trained yet
    for run in ("resnet18", "mine"):  # the quick start's resnet18; a folder of --output-dir
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "best.pth").write_bytes(checkpoints["resnet"].read_bytes())
    expected = f"no checkpoint at {tmp_path / 'runs' / 'resnet34' / 'best.pth'}; trained here: "
    mine = tmp_path / "runs" / "mine" / "best.pth"
    assert refusal() == f"{expected}--weights {mine}, --arch resnet18"
    assert (
        predict_py.main(predict_py.get_args_parser().parse_args([photo, "--arch", "resnet18"])) == 0
    )


def test_top_k_defaults_to_half_the_classes_and_eval_shows_only_an_informative_one(
    checkpoints, flowers, tmp_path, capsys
):
    predict_py = load_script("lenet", "predict")
    help_text = " ".join(predict_py.get_args_parser().format_help().split())
    assert "(default: beside the checkpoint; none with --json)" in help_text  # --save's default

    def first_line(*argv) -> str:
        weights = ["--weights", checkpoints["lenet"], "--save", tmp_path / "f"]
        predict_py.main(predict_py.get_args_parser().parse_args(map(str, [*argv, *weights])))
        return capsys.readouterr().out.splitlines()[0]

    line = first_line(sorted(flowers.glob("val/roses/*"))[0])
    assert len(line.split(": ", 1)[1].split(", ")) == 2  # 5 classes: the top 2
    for k, shown in ((None, "top-2 accuracy"), ("4", "top-4 accuracy"), ("5", None), ("1", None)):
        first = first_line(flowers / "val", "--eval", *(["--topk", k] if k else []))
        assert (shown in first) if shown else ("top-" not in first), first


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_maps_show_the_checkpoints_filters_and_each_stage_as_model_py_tables_it(
    family, checkpoints, flowers, tmp_path, monkeypatch, capsys
):
    predict_py = load_script(family, "predict")
    weights = tmp_path / "run" / "best.pth"  # a copy: the figure goes beside it, nothing else
    weights.parent.mkdir()
    weights.write_bytes(checkpoints[family].read_bytes())
    figures, save_figure = [], predict_py.utils.save_figure
    monkeypatch.setattr(
        predict_py.utils, "save_figure", lambda f, p: (figures.append(f), save_figure(f, p))
    )
    photo = sorted(flowers.glob("val/sunflowers/*"))[0]
    argv = [str(photo), "--weights", str(weights), "--feature-maps"]
    assert predict_py.main(predict_py.get_args_parser().parse_args(argv)) == 0
    assert sorted(p.name for p in weights.parent.iterdir()) == [
        "best.pth",
        f"features_{photo.stem}.png",
    ]
    (fig,) = figures
    assert not texts_outside(fig)
    checkpoint = torch.load(weights, weights_only=True)
    # The filters: the first convolution's weights (the first 4-d tensor), scaled together.
    first = next(t for t in checkpoint["model"].values() if t.dim() == 4)
    tiles = fig.subfigs[0].axes[1].get_images()[0].get_array()
    expected = make_grid(first[:, :3].float(), 16, normalize=True, pad_value=1).permute(1, 2, 0)
    assert torch.allclose(torch.as_tensor(tiles), expected)
    # Each stage's row: its name and shape as `python model.py` prints them at this image size.
    model_py = sys.modules[f"{family}_model"]  # the model.py predict.py imported
    network = predict_py.build_model(checkpoint)
    model_py.print_summary(network, checkpoint["image_size"], model_py.STAGES[checkpoint["arch"]])
    table = [line.split() for line in capsys.readouterr().out.splitlines() if "  <- " in line]
    marked = [(row[-1], " ".join(row[2:-3])) for row in table]  # name, "C x H x W"
    titles = [sub._suptitle.get_text() for sub in fig.subfigs[1:]]
    assert titles == [
        f"{name}: {shape}, the 8 channels that respond most" for name, shape in marked
    ]
    assert len(marked) == len(model_py.STAGES[checkpoint["arch"]]) >= 2


def test_feature_maps_take_one_photo(tiny_run, tiny):
    predict_py = load_script("lenet", "predict")
    photos = sorted(tiny.glob("val/a/*"))
    for argv, match in (
        ([*photos, "--feature-maps"], "--feature-maps draws one photo, without --cam: 2 photos"),
        ([photos[0], "--feature-maps", "--cam"], "--feature-maps draws one photo, without --cam"),
        ([tiny / "val", "--eval", "--feature-maps"], "--eval takes one folder .* --feature-maps"),
    ):
        with pytest.raises(predict_py.UserError, match=match):
            args = [*map(str, argv), "--weights", str(tiny_run), "--json"]
            predict_py.main(predict_py.get_args_parser().parse_args(args))


# --- images as users have them ---------------------------------------------------------------


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """A 60 x 30 picture, red on its left half, stored with EXIF orientation 6 (turn 90 CW)."""
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(img, path, format="JPEG", exif=exif.tobytes(), quality=95)


def image_kinds(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 20, 40))
    sixteen = Image.new("I;16", (40, 40))
    sixteen.paste(65535, (0, 0, 20, 40))
    palette = Image.new("RGB", (40, 40), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE)
    gif_frames = [Image.new("RGB", (40, 40), c).convert("P") for c in ((255, 255, 0), (0, 0, 0))]
    gif = folder / "animated.gif"
    gif_frames[0].save(gif, save_all=True, append_images=gif_frames[1:])
    return {
        "rgba.png": save(rgba, folder / "rgba.png"),
        "cmyk.jpg": save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), folder / "cmyk.jpg"),
        "rotated.jpg": exif_rotated_jpeg(folder / "rotated.jpg"),
        "gray.png": save(Image.new("L", (40, 40), 90), folder / "gray.png"),
        "palette.png": save(palette, folder / "palette.png"),
        "sixteen.png": save(sixteen, folder / "sixteen.png"),
        "animated.gif": gif,
        "photo.webp": save(Image.new("RGB", (40, 40), (9, 99, 199)), folder / "photo.webp"),
        "photo.bmp": save(Image.new("RGB", (40, 40), (199, 99, 9)), folder / "photo.bmp"),
    }


@pytest.mark.parametrize("reader", ["open_rgb", "load_image"])
def test_every_kind_of_image_is_read_as_upright_rgb_by_both_scripts(tmp_path, reader):
    # predict.py reads photos with open_rgb; train.py's datasets with load_image, which calls it.
    load_image = getattr(load_script("lenet", "utils"), reader)
    kinds = image_kinds(tmp_path / "kinds")
    for name, path in kinds.items():
        img = load_image(path)
        assert img.mode == "RGB", name
    rotated = load_image(kinds["rotated.jpg"])
    assert rotated.size == (30, 60)  # turned upright: now tall
    red_top = rotated.getpixel((15, 10))
    assert red_top[0] > 200 and red_top[2] < 60, red_top  # the red half is on top after turning
    assert load_image(kinds["rgba.png"]).getpixel((30, 20)) == (255, 255, 255)  # transparent
    assert load_image(kinds["rgba.png"]).getpixel((5, 20)) == (0, 255, 0)
    sixteen = load_image(kinds["sixteen.png"])
    assert sixteen.getpixel((5, 5)) == (255, 255, 255) and sixteen.getpixel((30, 5)) == (0, 0, 0)
    cyan_free = load_image(kinds["cmyk.jpg"]).getpixel((20, 20))
    assert cyan_free[0] > 200 and cyan_free[1] < 60 and cyan_free[2] < 60  # CMYK M+Y is red
    assert load_image(kinds["animated.gif"]).getpixel((5, 5))[:2] == (255, 255)  # first frame


def bomb_png(path: Path) -> Path:
    """A PNG whose header claims 20000 x 20000 pixels (over Pillow's limit), a few bytes long."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_every_image_kind_is_predicted_and_every_bad_file_is_named(checkpoints, tmp_path):
    kinds = image_kinds(tmp_path / "kinds")
    bad = tmp_path / "bad"
    bad.mkdir()
    good = jpeg_bytes(3, size=(200, 160))
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "notes.jpg").write_text("a text file that calls itself a JPEG\n")
    (bad / "empty.jpg").write_bytes(b"")
    bomb_png(bad / "bomb.png")
    (tmp_path / "empty_folder").mkdir()
    missing = tmp_path / "missing.jpg"
    result = predict(
        "lenet",
        tmp_path / "kinds",
        bad,
        tmp_path / "empty_folder",
        missing,
        "--weights",
        checkpoints["lenet"],
        "--json",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    predicted = {Path(r["file"]).name for r in json.loads(result.stdout)}
    assert predicted == set(kinds)
    errors = result.stderr.strip().splitlines()
    assert all(line.startswith("lenet/predict.py: error: ") for line in errors)
    expected = {
        "truncated.jpg": "truncated",
        "notes.jpg": "not an image",
        "empty.jpg": "empty",
        "bomb.png": "decompression bomb",
        "empty_folder": "no photos",
        "missing.jpg": "no such file",
    }
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in errors), (name, errors)
    assert len(errors) == len(expected)


# --- checkpoints -----------------------------------------------------------------------------


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = tmp_path / "best.pth"
    torch.save({"family": "resnet", "model": Exploit(), "classes": ["a"]}, weights)
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes(1))
    result = predict("resnet", image, "--weights", weights)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a checkpoint" in result.stderr
    assert not marker.exists()


def test_checkpoint_problems_are_one_clear_line(checkpoints, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes(1))
    text = tmp_path / "text.pth"
    text.write_text("hello")
    cases = [
        (
            ("resnet", image, "--arch", "resnet50"),
            ["no checkpoint", "resnet/train.py --arch resnet50"],
        ),
        (("googlenet", image, "--weights", tmp_path / "nope.pth"), ["googlenet/train.py"]),
        (
            ("vgg", image, "--weights", checkpoints["resnet"]),
            ["of the resnet folder", "use resnet/"],
        ),
        (
            ("resnet", image, "--weights", checkpoints["resnet"], "--arch", "resnet34"),
            ["holds resnet18", "--arch resnet34"],
        ),
        (("lenet", image, "--weights", text), ["not a checkpoint"]),
    ]
    for (family, *args), needles in cases:
        predict_py = load_script(family, "predict")
        with pytest.raises(predict_py.UserError) as error:
            predict_py.main(predict_py.get_args_parser().parse_args(map(str, args)))
        for needle in needles:
            assert needle in str(error.value), (needle, str(error.value))
    # As a command, each is one line on stderr: the last case, run as a user would.
    result = predict(family, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the same preprocessing and the same code in five files ----------------------------------


def test_preprocessing_is_train_py_validation_path():
    train_py = load_script("resnet", "train")
    predict_py = load_script("resnet", "predict")
    img = Image.open(io.BytesIO(jpeg_bytes(5, size=(333, 250)))).convert("RGB")
    for size in (32, 96, 224):
        expected = train_py.build_transforms(size, "crop-flip", 0.08)[1](img)
        got = predict_py.val_transform(size, train_py.MEAN, train_py.STD)(img)
        assert torch.equal(expected, got)


def test_shared_predict_functions_are_identical_in_the_five_files():
    reference = shared_definitions("resnet", "predict.py")
    assert {"predict", "draw", "main", "__main__"} <= set(reference)
    for family in FAMILIES:
        theirs = shared_definitions(family, "predict.py")
        differing = [n for n in {*reference, *theirs} if theirs.get(n) != reference.get(n)]
        assert differing == [], (
            f"{family}/predict.py differs from resnet's in {differing}: edit resnet's, then "
            f"run `python tests/sync_shared.py`"
        )


# --- the defects the simplification fixed ----------------------------------------------------


def test_predict_keeps_no_picture_and_the_figure_opens_the_first_photos_only(
    tiny_run, tmp_path, monkeypatch
):
    """Memory does not grow with the folder: predict() keeps indices and probabilities, and the
    figure opens at most MAX_GRID photos."""
    predict_py = load_script("lenet", "predict")
    checkpoint = torch.load(tiny_run, weights_only=True)
    model, cpu = predict_py.build_model(checkpoint).eval(), torch.device("cpu")
    photo = tiny_run.parent.parent / "tiny" / "val" / "a" / "0.jpg"
    files = [photo] * (predict_py.MAX_GRID + 7)
    transform = predict_py.val_transform(32, checkpoint["mean"], checkpoint["std"])
    args = argparse.Namespace(batch_size=8, json=True)
    read, probabilities, problems = predict_py.predict(model, files, transform, 64, args, cpu)
    assert read == list(range(len(files))) and len(probabilities) == len(files) and not problems
    opened, open_rgb = [], predict_py.utils.open_rgb
    monkeypatch.setattr(predict_py.utils, "open_rgb", lambda *a: opened.append(a) or open_rgb(*a))
    figure = tmp_path / "grid.png"
    predict_py.draw_predictions(model, checkpoint, 64, cpu, files, probabilities, figure, False)
    assert len(opened) == predict_py.MAX_GRID and figure.read_bytes()[:4] == b"\x89PNG"


def test_the_default_workers_are_shared_and_an_explicit_value_is_kept():
    utils = load_script("lenet", "utils")
    cpu = torch.device("cpu")
    alone, shared = utils.Run(cpu, None, ""), utils.Run(cpu, None, "", 0, 2, local_world_size=2)
    default = min(8, os.cpu_count() or 1)
    assert utils.loader_workers(None, alone) == default
    assert utils.loader_workers(None, shared) == max(1, default // 2)
    assert utils.loader_workers(default, shared) == default  # given: taken as given


def test_seeds_are_the_same_everywhere():
    """Not Python's hash(), an implementation detail: a string's digest, the same number on
    every machine, Python version and PYTHONHASHSEED (random.Random seeds from its SHA-512)."""
    utils = load_script("lenet", "utils")
    assert utils.seed_for(0, 1, 2) == 251277800507919 != utils.seed_for(0, 2, 1)


def test_the_confusion_figure_hands_matplotlib_numpy_arrays():
    utils = load_script("lenet", "utils")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy 2 deprecates what a torch tensor gives imshow
        fig = utils.confusion_figure(torch.tensor([[3, 1], [0, 2]]), ["a", "b"], "title")
        fig.savefig(io.BytesIO(), format="png")


def test_folders_give_their_photos_sorted_without_hidden_ones(tmp_path):
    predict_py = load_script("lenet", "predict")
    photos = tmp_path / "photos"
    for name in ("b.jpg", "sub/c.PNG", ".hidden.jpg", ".thumbs/d.jpg", "sub/._e.jpg", "notes.txt"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(jpeg_bytes(1))
    (tmp_path / "empty").mkdir()
    one = photos / ".hidden.jpg"  # named on the command line: taken as given
    files, problems = predict_py.find_images([photos, one, tmp_path / "empty", tmp_path / "nope"])
    assert files == [photos / "b.jpg", photos / "sub" / "c.PNG", one]
    assert [p.split(":")[0] for p in problems] == [str(tmp_path / "empty"), str(tmp_path / "nope")]
