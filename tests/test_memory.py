"""benchmarks/memory.py: its count of what a training step holds is right."""

import sys

import torch
from torch import nn

from conftest import REPO, load_module

sys.path.insert(0, str(REPO / "benchmarks"))  # memory.py imports throughput.py beside it


def test_saved_tensors_are_counted_once_per_storage_and_apart_from_the_weights():
    memory = load_module(REPO / "benchmarks" / "memory.py", "benchmarks_memory")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 5)
    )
    x = torch.randn(2, 3, 16, 16)
    params = list(model.parameters())
    parts = memory.step_memory(model, lambda: model(x).sum().backward(), params, None)
    # Independently: the convolution saves its input, the ReLU its output, which the linear
    # layer saves again (through a view of the same storage); the weights are not activations.
    expected = x.numel() * 4 + 2 * 8 * 16 * 16 * 4
    assert abs(parts["saved_activations"] - expected) <= 0.1 * expected
    assert parts["autocast_copies"] == 0


def test_autocast_copies_of_the_weights_are_told_apart():
    memory = load_module(REPO / "benchmarks" / "memory.py", "benchmarks_memory")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(4, 64)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()

    parts = memory.step_memory(model, step, list(model.parameters()), torch.bfloat16)
    # The second layer keeps the bf16 cast of its weight to pass the gradient back; the first
    # needs none, as the input wants no gradient.
    assert parts["autocast_copies"] == 32 * 5 * 2
    # Activations: the bf16 input and the ReLU output, which the ReLU and the second layer
    # both keep: one storage, counted once.
    assert parts["saved_activations"] == (4 * 64 + 4 * 32) * 2


def test_the_estimate_of_a_real_recipe_adds_up():
    memory = load_module(REPO / "benchmarks" / "memory.py", "benchmarks_memory")
    row = memory.estimate("lenet", 8, torch.bfloat16)
    weights = 4 * sum(p.numel() for p in memory.load_train_py("lenet").LeNet(5).parameters())
    assert row["weights"] == row["gradients"] == weights
    assert abs(row["optimizer"] - 2 * weights) <= 64  # AdamW's two moments (and step counts)
    parts = ("weights", "gradients", "optimizer", "autocast_copies", "saved_activations")
    assert row["total"] == sum(row[k] for k in parts)


def test_the_linear_extension_matches_a_step_at_the_full_batch(monkeypatch):
    memory = load_module(REPO / "benchmarks" / "memory.py", "benchmarks_memory")
    monkeypatch.setitem(memory.NETWORKS, "resnet18_small", ("resnet", "resnet18", 6, 64))
    model, _, step, _ = memory.build("resnet18_small", torch.device("cpu"), torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    direct = memory.step_memory(model, lambda: step(6), params, torch.bfloat16)
    extended = memory.estimate("resnet18_small", 6, torch.bfloat16)
    for kind in ("saved_activations", "autocast_copies"):
        assert abs(extended[kind] - direct[kind]) <= 0.01 * direct[kind], kind
