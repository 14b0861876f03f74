"""Held-out evaluation: split_data.py --test-ratio, predict.py --eval and predict.py --cam."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (
    FAMILIES,
    REPO,
    SAMPLE,
    SMALL,
    jpeg_bytes,
    load_module,
    load_script,
    run_script,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(script: str, *args, **kwargs):
    return run_script(REPO / script, *args, **kwargs)


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")}


@pytest.fixture(scope="module")
def three_way(tmp_path_factory) -> Path:
    """The real sample split 8:1:1 into train/val/test."""
    out = tmp_path_factory.mktemp("three_way") / "flower_data"
    made = run("split_data.py", "--source", SAMPLE, "--out", out, "--test-ratio", "0.1")
    assert made.returncode == 0, made.stderr
    return out


@pytest.fixture(scope="module")
def resnet_run(three_way, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resnet_run")
    trained = run(
        "resnet/train.py",
        "--data-path",
        three_way,
        "--epochs",
        "2",
        "--output-dir",
        out,
        "--amp",
        "off",
        *SMALL["resnet"],
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return out


# --- split_data.py --test-ratio --------------------------------------------------------------


def test_test_ratio_adds_a_stratified_deterministic_test_folder(three_way, tmp_path):
    manifest = json.loads((three_way / "split.json").read_text())
    assert manifest["test_ratio"] == 0.1
    assert (manifest["train"], manifest["val"], manifest["test"]) == (120, 15, 15)
    assert all(c == {"train": 24, "val": 3, "test": 3} for c in manifest["classes"].values())
    subsets = {sub: files_of(three_way / sub) for sub in ("train", "val", "test")}
    assert not subsets["train"] & subsets["test"] and not subsets["val"] & subsets["test"]
    assert sum(map(len, subsets.values())) == 150

    again = tmp_path / "again"
    assert (
        run("split_data.py", "--source", SAMPLE, "--out", again, "--test-ratio", "0.1").returncode
        == 0
    )
    assert files_of(again / "test") == subsets["test"]
    # val is the one the classic 9:1 split makes: a test split only takes from train.
    classic = tmp_path / "classic"
    assert run("split_data.py", "--source", SAMPLE, "--out", classic).returncode == 0
    assert files_of(classic / "val") == subsets["val"] and not (classic / "test").exists()

    # Re-splitting without a test folder removes the old one with the rest of the old split.
    assert run("split_data.py", "--source", SAMPLE, "--out", again).returncode == 0
    assert not (again / "test").exists()
    assert json.loads((again / "split.json").read_text())["test"] == 0


def test_a_test_ratio_that_leaves_nothing_is_refused(tmp_path):
    for c, name in enumerate(("a", "b")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(jpeg_bytes(c * 10 + i))
    for ratio, needle in (("0.05", "none would go to test"), ("0.95", "--test-ratio")):
        result = run(
            "split_data.py",
            "--source",
            tmp_path / "src",
            "--out",
            tmp_path / "out",
            "--test-ratio",
            ratio,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert needle in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


# --- predict.py --eval -----------------------------------------------------------------------


def test_eval_gives_the_val_accuracy_that_train_logged(three_way, resnet_run):
    """The run trained with --amp off, as predict.py computes: the same numbers."""
    result = run(
        "resnet/predict.py",
        three_way / "val",
        "--eval",
        "--json",
        "--weights",
        resnet_run / "best.pth",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout)
    assert scores["images"] == 15
    last = torch.load(resnet_run / "last.pth", weights_only=True)
    assert scores["accuracy"] == pytest.approx(last["history"][-1]["val_acc"], abs=1e-4)
    matrix = torch.tensor(scores["confusion_matrix"])
    assert matrix.sum() == 15 and matrix.diag().sum() / 15 == pytest.approx(scores["accuracy"])
    assert len(scores["misclassified"]) == 15 - matrix.diag().sum()
    probabilities = [m["probability"] for m in scores["misclassified"]]
    assert probabilities == sorted(probabilities, reverse=True)

    out = resnet_run / "eval_val"
    assert [Path(p) for p in scores["outputs"]] == [
        out / "confusion_matrix.png",
        out / "misclassified.png",
    ]
    for png in ("confusion_matrix.png", "misclassified.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_eval_on_the_test_folder_prints_the_table(three_way, resnet_run, tmp_path):
    result = run(
        "resnet/predict.py",
        three_way / "test",
        "--eval",
        "--topk",
        "2",
        "--weights",
        resnet_run / "best.pth",
        "--save",
        tmp_path / "report",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert re.match(r".*test: 15 images, accuracy [\d.]+, top-2 accuracy [\d.]+$", lines[0])
    assert lines[1].split() == ["class", "precision", "recall", "f1", "images"]
    rows = [line.split() for line in lines[2:7]]
    assert [row[0] for row in rows] == sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    # Recall per class from the confusion matrix: its weighted mean is the accuracy.
    accuracy = float(re.search(r"accuracy ([\d.]+),", lines[0]).group(1))
    assert sum(int(row[4]) * float(row[2]) for row in rows) / 15 == pytest.approx(
        accuracy, abs=2e-3
    )
    for _, precision, recall, f1, _ in rows:  # F1: the harmonic mean of the two
        p, r = float(precision), float(recall)
        assert float(f1) == pytest.approx(2 * p * r / (p + r) if p + r else 0, abs=2e-3)
    assert (tmp_path / "report" / "misclassified.png").is_file()


def test_score_computes_accuracy_the_matrix_and_the_mistakes():
    predict_py = load_script("lenet", "predict")
    classes = ["a", "b", "c"]
    # true a a a b b c ; predicted a a b b c c (probabilities chosen to rank the mistakes)
    truth, said = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    confidence = [0.9, 0.8, 0.6, 0.7, 0.95, 0.5]
    probabilities = torch.zeros(6, 3)
    for i, (t, p, c) in enumerate(zip(truth, said, confidence, strict=True)):
        probabilities[i] = (1 - c) * 0.3
        probabilities[i, t] = (1 - c) * 0.7  # the truth is the runner-up of every mistake
        probabilities[i, p] = c
    files, labels = [Path(f"{i}.jpg") for i in range(6)], torch.tensor(truth)
    scores = predict_py.score(files, labels, probabilities, classes, k=2)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert [m["file"] for m in scores["misclassified"]] == ["4.jpg", "2.jpg"]
    assert scores["top_k_accuracy"] == pytest.approx(1.0)
    for k in (1, 3):  # top-1 is the accuracy; the top 3 of 3 classes are always right
        assert "top_k_accuracy" not in predict_py.score(files, labels, probabilities, classes, k=k)
    # a: 2 of 2 said a are a, 2 of 3 a found; b: 1 of 2, 1 of 2; c: 1 of 2, 1 of 1.
    per_class = [m[key] for m in scores["per_class"].values() for key in ("precision", "recall")]
    per_class += [m[key] for m in scores["per_class"].values() for key in ("f1", "images")]
    assert list(scores["per_class"]) == classes
    assert per_class == pytest.approx([1, 2 / 3, 0.5, 0.5, 0.5, 1, 0.8, 3, 0.5, 2, 2 / 3, 1])


def test_eval_names_bad_folders_and_files_and_scores_the_rest(tiny, tiny_run, tmp_path):
    weights = ["--weights", tiny_run, "--save", tmp_path / "report"]

    predict_py = load_script("lenet", "predict")

    def refused(*argv, match: str) -> None:
        with pytest.raises(predict_py.UserError, match=match):
            predict_py.main(predict_py.get_args_parser().parse_args(list(map(str, argv))))

    stray = tiny / "val" / "zebra"
    stray.mkdir()
    refused(tiny / "val", "--eval", *weights, match="zebra: not a class of the checkpoint")
    stray.rmdir()

    for image in (tiny / "val" / "c").iterdir():
        image.unlink()
    (tiny / "val" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run("lenet/predict.py", tiny / "val", "--eval", "--json", *weights)
    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert any("broken.jpg" in e for e in errors) and any("/c" in e for e in errors)
    scores = json.loads(result.stdout)
    assert scores["images"] == 4 and [row[2] for row in scores["confusion_matrix"]] == [0, 0, 0]
    assert sum(scores["confusion_matrix"][2]) == 0  # class c: no photo left

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "--eval", *weights, match="pass a folder of class sub-folders")


# --- Grad-CAM --------------------------------------------------------------------------------


class QuadrantNet(nn.Module):
    """A network whose logit for class 1 depends only on the top-left quadrant."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        h, w = f.shape[-2:]
        return self.head(f[:, :, : h // 2, : w // 2].mean(dim=(2, 3)))


def test_grad_cam_puts_its_mass_where_the_logit_looks():
    predict_py = load_script("resnet", "predict")
    torch.manual_seed(0)
    model = QuadrantNet().eval()
    x = torch.rand(1, 3, 32, 48)
    cam = predict_py.grad_cam(model, model.features, x, target=1)
    assert cam.shape == (32, 48)
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() == 1
    quadrant = cam[:16, :24].sum() / cam.sum()
    assert quadrant > 0.9, quadrant.item()
    assert all(p.grad is None for p in model.parameters()), "gradients must not leak"


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_cam_runs_on_every_kind_of_network_of_the_folder(family):
    predict_py = load_script(family, "predict")
    model_py = load_module(REPO / family / "model.py", f"{family}_model_cam")
    size = int(SMALL[family][-1])
    # Each kind of block: plain and batch-norm VGG; ResNet's basic and bottleneck, ResNeXt's.
    kinds = {"vgg": ["vgg11", "vgg11_bn"], "resnet": ["resnet18", "resnet50", "resnext50_32x4d"]}
    archs = kinds.get(family, [None])
    builders = {
        "lenet": lambda: model_py.LeNet(num_classes=3),
        "alexnet": lambda: model_py.AlexNet(num_classes=3),
        "googlenet": lambda: model_py.GoogLeNet(3, aux_logits=False),
    }
    for arch in archs:
        model = builders[family]() if arch is None else model_py.ARCHS[arch](num_classes=3)
        model = model.eval().to(memory_format=torch.channels_last)
        layer = model.get_submodule(predict_py.CAM_LAYER)
        x = torch.rand(1, 3, size, size).to(memory_format=torch.channels_last)
        cam = predict_py.grad_cam(model, layer, x, target=2)
        assert cam.shape == (size, size), (family, arch)
        assert 0 <= cam.min() and cam.max() <= 1, (family, arch)


def test_predict_cam_draws_the_overlay_and_names_the_layer(
    tiny, tiny_run, tmp_path, capsys, monkeypatch
):
    weights = ["--weights", tiny_run]
    one = run(
        "lenet/predict.py",
        tiny / "val" / "a" / "0.jpg",
        "--cam",
        *weights,
        "--save",
        tmp_path / "one.png",
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    predict_py = load_script("lenet", "predict")

    def main(*argv):
        return predict_py.main(predict_py.get_args_parser().parse_args(list(map(str, argv))))

    drawn, draw = [], predict_py.draw
    monkeypatch.setattr(predict_py, "draw", lambda *a: drawn.append(a) or draw(*a))
    assert main(tiny / "val", "--cam", *weights, "--save", tmp_path / "grid.png") == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    files, titles, _, _, pictures = drawn[0]
    assert len(files) == len(titles) == len(pictures) == 6  # the 6 val photos, each overlaid
    assert all(t.endswith("\nGrad-CAM at conv2") for t in titles)
    assert all(picture.shape == (32, 32, 3) for picture in pictures)  # the 32-pixel crop
    assert main(tiny / "val" / "a" / "0.jpg", "--cam", *weights) == 0
    cam = tiny_run.parent / "cam_0.png"  # never prediction_0.png: a plain run's figure stays
    assert capsys.readouterr().out.strip().endswith(f"figure saved to {cam}") and cam.is_file()
    with pytest.raises(predict_py.UserError, match="--eval takes one folder .*without --cam"):
        main(tiny / "val", "--cam", "--eval", *weights)


def test_the_cam_overlay_stays_in_the_range_imshow_takes(tiny_run, tmp_path, monkeypatch):
    """A white photo under the hottest red: float rounding must not step past 1 (imshow would
    clip it with a warning per picture)."""
    predict_py = load_script("lenet", "predict")
    checkpoint = torch.load(tiny_run, weights_only=True)
    model, cpu = predict_py.build_model(checkpoint).eval(), torch.device("cpu")
    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), "white").save(white)
    red = torch.full((32, 32), 0.75)  # where the jet colour map's red is 1
    monkeypatch.setattr(predict_py, "grad_cam", lambda *args: red)
    drawn = []
    monkeypatch.setattr(predict_py, "draw", lambda *args: drawn.append(args))
    probabilities = torch.tensor([[0.2, 0.3, 0.5]])
    predict_py.draw_predictions(model, checkpoint, 64, cpu, [white], probabilities, None, True)
    picture = drawn[0][4][0]
    assert picture[..., 0].max() == pytest.approx(1.0) and picture.max() <= 1
