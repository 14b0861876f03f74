"""model.py: shapes, parameter counts, torchvision equivalence, GoogLeNet's heads, training."""

import ast
import math

import pytest
import torch
import torchvision
from torch import nn

from conftest import FAMILIES, REPO, load_module, model_py_output, run_script

lenet = load_module(REPO / "lenet" / "model.py")
alexnet = load_module(REPO / "alexnet" / "model.py")
vgg = load_module(REPO / "vgg" / "model.py")
googlenet = load_module(REPO / "googlenet" / "model.py")
resnet = load_module(REPO / "resnet" / "model.py")

# (constructor, native input size) of each family's default network.
DEFAULTS = {
    "lenet": (lenet.LeNet, 32),
    "alexnet": (alexnet.AlexNet, 224),
    "vgg": (vgg.vgg16, 224),
    "googlenet": (googlenet.GoogLeNet, 224),
    "resnet": (resnet.resnet34, 224),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes_in_train_and_eval(family):
    torch.manual_seed(0)
    build, size = DEFAULTS[family]
    model = build(num_classes=7)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    logits = out.logits if family == "googlenet" else out
    assert logits.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_parameter_counts_of_the_brief():
    assert n_params(lenet.LeNet(num_classes=10)) == 121_182
    assert n_params(alexnet.AlexNet()) == 28_868_968
    assert n_params(googlenet.GoogLeNet(aux_logits=False)) == 6_998_552
    assert n_params(googlenet.GoogLeNet(aux_logits=True)) == 13_378_280


def test_alexnet_first_stage_is_55_by_55():
    model = alexnet.AlexNet()
    assert model.features[:2](torch.zeros(1, 3, 224, 224)).shape == (1, 96, 55, 55)
    assert model.features(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 6, 6)


@pytest.mark.parametrize(
    "module, arch", [(vgg, a) for a in vgg.ARCHS] + [(resnet, a) for a in resnet.ARCHS]
)
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_logits(module, arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    # BN running statistics are 0/1 at init: give them values so eval mode tests them too.
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    with torch.device("meta"):  # no time spent on an init that the reference's weights replace
        ours = module.ARCHS[arch]().eval()
    assert n_params(ours) == n_params(reference)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


def test_every_architecture_names_stages_that_it_has():
    """STAGES, which predict.py --feature-maps draws, names modules of every --arch (for VGG
    the five max pools that end its blocks, which move with batch norm and depth)."""
    builders = {"lenet": {"lenet": lenet.LeNet}, "alexnet": {"alexnet": alexnet.AlexNet}}
    builders |= {"googlenet": {"googlenet": googlenet.GoogLeNet}}
    for module in (lenet, alexnet, googlenet, vgg, resnet):
        archs = getattr(module, "ARCHS", None) or builders[module.__name__.split("_")[0]]
        assert set(module.STAGES) == set(archs)
        for arch, build in archs.items():
            with torch.device("meta"):  # no memory, no time: only the modules' names
                model = build()
            names = module.STAGES[arch]
            assert len(names) >= 2 and all(model.get_submodule(n) for n in names), arch
            if module is vgg:
                assert [type(model.get_submodule(n)) for n in names] == [nn.MaxPool2d] * 5


def test_resnet_include_top_false_returns_the_feature_map():
    model = resnet.resnet50(include_top=False).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    assert not any(k.startswith("fc.") for k in model.state_dict())


def test_resnet_zero_init_residual_zeroes_the_last_bn_of_each_block():
    for build, last in ((resnet.resnet18, "bn2"), (resnet.resnet50, "bn3")):
        model = build(zero_init_residual=True)
        blocks = [
            m for m in model.modules() if isinstance(m, resnet.BasicBlock | resnet.Bottleneck)
        ]
        assert blocks and all(getattr(b, last).weight.abs().sum() == 0 for b in blocks)
        assert model.bn1.weight.abs().sum() > 0


def test_googlenet_aux_heads_only_in_training():
    torch.manual_seed(0)
    model = googlenet.GoogLeNet(num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    out = model.train()(x)
    assert isinstance(out, googlenet.GoogLeNetOutputs)
    assert [t.shape for t in out] == [(2, 5)] * 3
    assert not torch.equal(out.aux1, out.aux2)
    with torch.no_grad():
        assert isinstance(model.eval()(x), torch.Tensor)
    no_aux = googlenet.GoogLeNet(num_classes=5, aux_logits=False).train()
    assert isinstance(no_aux(x), torch.Tensor)
    assert no_aux.aux1 is None and no_aux.aux2 is None


def test_googlenet_checkpoint_with_aux_loads_into_an_aux_free_model():
    torch.manual_seed(0)
    trained = googlenet.GoogLeNet(num_classes=5, aux_logits=True).eval()
    state = trained.state_dict()
    inference = googlenet.GoogLeNet(num_classes=5, aux_logits=False).eval()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        inference.load_state_dict(state, strict=True)
    kept = googlenet.without_aux(state)
    assert set(state) - set(kept) == {k for k in state if k.startswith(("aux1.", "aux2."))}
    assert len(state) - len(kept) == 12  # conv, fc1, fc2 weight and bias in each head
    inference.load_state_dict(kept, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x))
    # A checkpoint that really does not fit still fails loudly.
    other = googlenet.without_aux(googlenet.GoogLeNet(num_classes=3).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        inference.load_state_dict(other, strict=True)
    del kept["fc.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        inference.load_state_dict(kept, strict=True)


@pytest.mark.parametrize(
    "name, build, size",
    [
        ("lenet", lambda: lenet.LeNet(num_classes=4), 32),
        ("alexnet", lambda: alexnet.AlexNet(num_classes=4), 224),
        ("vgg11_bn", lambda: vgg.vgg11_bn(num_classes=4), 64),
        ("googlenet", lambda: googlenet.GoogLeNet(num_classes=4), 224),
        ("resnet18", lambda: resnet.resnet18(num_classes=4), 64),
        ("resnext50_32x4d", lambda: resnet.resnext50_32x4d(num_classes=4), 64),
    ],
)
def test_one_step_changes_every_parameter(name, build, size):
    torch.manual_seed(0)
    model = build().train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    out = model(x)
    if isinstance(out, googlenet.GoogLeNetOutputs):
        loss = nn.functional.cross_entropy(out.logits, y) + 0.3 * (
            nn.functional.cross_entropy(out.aux1, y) + nn.functional.cross_entropy(out.aux2, y)
        )
    else:
        loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    optimizer.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == []


def test_initialisation_reaches_every_layer():
    torch.manual_seed(0)
    cases = [
        (vgg.vgg16_bn(), "fan_out"),
        (alexnet.AlexNet(), "fan_out"),
        (googlenet.GoogLeNet(), "fan_in"),
        (resnet.resnet50(), "fan_out"),
    ]
    for model, mode in cases:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            fan = nn.init._calculate_correct_fan(conv.weight, mode)
            expected = math.sqrt(2.0 / fan)
            assert abs(conv.weight.std().item() / expected - 1) < 0.15, conv
            if conv.bias is not None:
                assert conv.bias.abs().sum() == 0
        if isinstance(model, resnet.ResNet):
            continue  # torchvision keeps PyTorch's default for the ResNet classifier
        for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
            assert abs(linear.weight.std().item() - 0.01) < 0.002, linear
            assert linear.bias.abs().sum() == 0


@pytest.mark.parametrize(
    "folder, args, params",
    [
        ("lenet", [], 121_182),
        ("alexnet", [], 28_868_968),
        ("vgg", ["vgg11"], 132_863_336),
        ("googlenet", [], 6_998_552),
        ("resnet", [], 21_797_672),
    ],
)
def test_model_py_prints_a_layer_table_and_totals(folder, args, params):
    result = model_py_output(folder, *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    assert f"parameters: {params:,}" in lines
    flops = [line for line in lines if line.startswith("FLOPs for one")]
    assert len(flops) == 1 and float(flops[0].split(":")[1].split()[0]) > 0
    assert len(lines) > 8


def test_unknown_arch_in_model_py_is_one_line():
    result = run_script(REPO / "resnet" / "model.py", "resnet35")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown architecture 'resnet35'" in result.stderr


def test_print_summary_is_identical_in_the_five_model_files():
    def function_dump(path, name):
        tree = ast.parse(path.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        return ast.dump(node)

    dumps = {f: function_dump(REPO / f / "model.py", "print_summary") for f in FAMILIES}
    assert len(set(dumps.values())) == 1, "print_summary differs between the model.py files"
