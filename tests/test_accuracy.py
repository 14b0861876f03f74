"""benchmarks/accuracy.py: its folds, its arithmetic, and one small run of both recipes."""

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, jpeg_bytes, load_module, run_script

sys.path.insert(0, str(REPO / "benchmarks"))  # accuracy.py imports throughput.py beside it
accuracy = load_module(REPO / "benchmarks" / "accuracy.py", "benchmarks_accuracy")


def photo_folder(root: Path, sizes: dict[str, int]) -> dict[str, list[Path]]:
    photos = {}
    for c, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(60 * c + i, size=(40, 36)))
        (root / name / "notes.txt").write_text("not a photo")
        photos[name] = sorted((root / name).glob("*.jpg"))
    return photos


def test_folds_test_every_photo_once_stratified_and_the_same_every_time(tmp_path):
    photos = photo_folder(tmp_path, {"a": 11, "b": 7, "c": 9})
    assert accuracy.list_photos(tmp_path) == photos  # notes.txt is not a photo
    folds = accuracy.make_folds(photos, 3)
    assert folds == accuracy.make_folds(photos, 3)
    tested = [f for fold in folds for files in fold.values() for f in files]
    assert sorted(tested) == sorted(f for files in photos.values() for f in files)
    for name, files in photos.items():  # each class spread evenly: sizes differ by one at most
        sizes = [len(fold.get(name, [])) for fold in folds]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(files)
    totals = [sum(map(len, fold.values())) for fold in folds]
    assert max(totals) - min(totals) <= 1  # remainders go to different folds
    with pytest.raises(accuracy.BenchmarkError, match="--folds 8"):
        accuracy.make_folds(photos, 8)  # more folds than class b has photos


def test_val_is_carved_from_the_training_part_with_every_class():
    part = {"a": [Path(f"a{i}") for i in range(20)], "b": [Path(f"b{i}") for i in range(3)]}
    train, val = accuracy.carve_val(part, 0.1, fold=0)
    assert [len(val["a"]), len(val["b"])] == [2, 1]  # at least one photo of each class
    for name in part:
        assert not set(train[name]) & set(val[name])
        assert sorted(train[name] + val[name]) == sorted(part[name])


def test_summary_pools_the_folds_of_a_seed_and_compares_fold_by_fold():
    def run(recipe, fold, seed, acc, n):
        return {
            "folder": "lenet",
            "recipe": recipe,
            "fold": fold,
            "seed": seed,
            "n_test": n,
            "test_acc": acc,
            "test_acc_last": acc / 2,
            "best_val_acc": 0.5,
            "image_size": 32,
        }

    runs = [
        run("classic", 0, 0, 0.5, 10),
        run("classic", 1, 0, 0.2, 5),
        run("classic", 0, 1, 0.3, 10),
        run("classic", 1, 1, 0.6, 5),
        run("ours", 0, 0, 0.6, 10),
        run("ours", 1, 0, 0.4, 5),
        run("ours", 0, 1, 0.4, 10),
        run("ours", 1, 1, 0.2, 5),
    ]
    classic, ours = accuracy.summarise(runs)
    # classic: seed 0 (5 + 1) / 15 = 0.4, seed 1 (3 + 3) / 15 = 0.4; ours: 8/15 and 5/15.
    assert classic["test_acc"] == pytest.approx(0.4) and classic["test_acc_std"] == 0
    assert ours["test_acc"] == pytest.approx(13 / 30)
    assert ours["test_acc_std"] == pytest.approx(abs(8 / 15 - 5 / 15) / 2**0.5)
    assert ours["gain"] == pytest.approx(13 / 30 - 0.4)
    # fold 0: ours 0.5 vs classic 0.4; fold 1: ours 0.3 vs classic 0.4.
    assert ours["folds_not_worse"] == (1, 2)
    assert ours["test_acc_last"] == pytest.approx(13 / 60)


def test_image_sizes_are_per_folder_and_lenet_stays_at_32():
    args = type("Args", (), {"sizes": accuracy.parse_sizes(["160", "vgg=112"])})()
    sizes = {f: accuracy.image_size(f, args) for f in accuracy.CLASSIC}
    assert sizes == {"lenet": 32, "alexnet": 160, "vgg": 112, "googlenet": 160, "resnet": 160}
    for bad in ("vg=112", "big", "16"):
        with pytest.raises(accuracy.BenchmarkError, match=f"--image-size {bad}"):
            accuracy.parse_sizes([bad])


def test_a_small_run_scores_both_recipes_on_held_out_photos_and_continues(tmp_path, capsys):
    photo_folder(tmp_path / "photos", {"a": 4, "b": 4})
    out = tmp_path / "result"
    argv = [
        "--data",
        tmp_path / "photos",
        "--folders",
        "lenet",
        "--folds",
        "2",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--out",
        out,
    ]
    result = run_script(REPO / "benchmarks" / "accuracy.py", *argv)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["runs"]
    assert sorted((r["recipe"], r["fold"]) for r in runs) == [
        ("classic", 0),
        ("classic", 1),
        ("ours", 0),
        ("ours", 1),
    ]
    for r in runs:  # 2 of each class per fold; accuracies are whole photos out of 4
        assert r["n_test"] == 4 and r["test_acc"] * 4 == pytest.approx(round(r["test_acc"] * 4))
    assert [r["kept_epoch"] for r in runs if r["recipe"] == "ours"] == [1, 1]
    assert "| lenet | lenet, 32 px | ours |" in out.with_suffix(".md").read_text()

    # The same command continues: nothing left to run (in this process: no interpreter to start).
    def main(*extra):
        accuracy.main(accuracy.get_args_parser().parse_args([*map(str, argv), *extra]))

    main("--recipes", "ours")
    assert "4 runs already done" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["runs"] == runs
    # A name already used with other train.py flags is refused (in one line, as a command).
    with pytest.raises(accuracy.BenchmarkError, match="pick another --name"):
        main("--ours-args=--lr 1e-2")


def test_each_folder_trains_its_own_model_py_after_another_was_loaded():
    for folder in ("lenet", "alexnet", "googlenet"):
        train_py = accuracy.load_train_py(folder)
        args = train_py.get_args_parser().parse_args([])
        assert type(train_py.build_model(args, 5)).__name__.lower() == folder


def test_an_image_size_a_network_cannot_take_is_refused_before_any_run(tmp_path):
    photo_folder(tmp_path / "photos", {"a": 2, "b": 2})
    result = run_script(
        REPO / "benchmarks" / "accuracy.py",
        "--data",
        tmp_path / "photos",
        "--folders",
        "googlenet",
        "--folds",
        "2",
        "--image-size",
        "64",
        "--out",
        tmp_path / "result",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--image-size 64 is too small for googlenet" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "result.json").exists()
