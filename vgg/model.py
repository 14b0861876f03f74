"""VGG 11/13/16/19, with and without batch normalisation, from one configuration table.

Paper: K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015. https://arxiv.org/abs/1409.1556

Configurations A, B, D and E of the paper's Table 1 (vgg11, vgg13, vgg16, vgg19). Module names,
order and shapes are torchvision's, so torchvision's ImageNet state dicts load with
strict=True. Deviations from the paper, all torchvision's too:
- The *_bn variants add batch normalisation after each convolution (the paper predates it).
- An adaptive average pool before the classifier keeps the 7 x 7 map at 224 x 224 (where it
  does nothing) and lets other image sizes through; the paper instead turned the classifier
  into convolutions at test time.
- Initialisation: kaiming normal (fan out) for the convolutions, normal(0, 0.01) for the linear
  layers, zero biases, instead of the paper's pre-training of A to start the deeper nets.
- Configuration C (1 x 1 convolutions) and LRN (A-LRN) are left out, as the paper found them
  no better than D and A.
vgg16 has 138,357,544 parameters with 1000 classes.

    $ python vgg/model.py            # layer table, parameters and FLOPs of vgg16
    $ python vgg/model.py vgg19_bn
"""

import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Output channels of each 3 x 3 convolution, "M" for a 2 x 2 max pool (paper, Table 1).
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", *[256] * 3, "M", *[512] * 3, "M", *[512] * 3, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


def make_features(config: list[int | str], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        init_weights: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.features(x)
        # N x 512 x 7 x 7 (five stages of 3 x 3 convolutions, each halved by a max pool:
        # 64 x 112, 128 x 56, 256 x 28, 512 x 14, 512 x 7)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 25088
        return self.classifier(x)
        # N x num_classes


def _vgg(config: str, batch_norm: bool, num_classes: int, init_weights: bool) -> VGG:
    return VGG(make_features(CONFIGS[config], batch_norm), num_classes, init_weights)


def vgg11(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg11", False, num_classes, init_weights)


def vgg11_bn(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg11", True, num_classes, init_weights)


def vgg13(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg13", False, num_classes, init_weights)


def vgg13_bn(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg13", True, num_classes, init_weights)


def vgg16(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg16", False, num_classes, init_weights)


def vgg16_bn(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg16", True, num_classes, init_weights)


def vgg19(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg19", False, num_classes, init_weights)


def vgg19_bn(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    return _vgg("vgg19", True, num_classes, init_weights)


ARCHS = {
    f.__name__: f for f in (vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn)
}


def block_ends(config: list[int | str], batch_norm: bool) -> list[str]:
    """The names of the max pools that end the blocks in make_features' Sequential."""
    names, index = [], 0
    for v in config:  # a convolution is 2 modules (3 with batch norm), a max pool 1
        index += 1 if v == "M" else 3 if batch_norm else 2
        names += [f"features.{index - 1}"] if v == "M" else []
    return names


# The outputs predict.py --feature-maps draws, per architecture: the end of each of the blocks.
STAGES = {a: block_ends(CONFIGS[a.removesuffix("_bn")], a.endswith("_bn")) for a in ARCHS}


def print_summary(model: nn.Module, image_size: int, stages: list[str]) -> None:
    """Print every stage's output shape and parameters, then the totals (d2l's layer summary);
    the row where each of stages ends is marked "<-" with its name.

    Containers (nn.Sequential) are opened up; any other module is one row, so a residual or
    Inception block shows as the single stage it is. FLOPs are counted by torch itself.
    """
    rows, handles = [], []

    def watch(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential):
                watch(child, f"{prefix}{name}.")
                continue

            def hook(m: nn.Module, inputs, output, name: str = f"{prefix}{name}") -> None:
                shape = " x ".join(str(d) for d in output.shape[1:])
                rows.append((name, type(m).__name__, shape, sum(p.numel() for p in m.parameters())))

            handles.append(child.register_forward_hook(hook))

    watch(model, "")
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()

    print(f"{'layer':<24}{'type':<20}{'output (C x H x W)':<22}{'params':>12}")
    # The row where each stage ends: its own, or its container's last (layer1: layer1.2).
    ends = {max(i for i, r in enumerate(rows) if f"{r[0]}.".startswith(f"{s}.")): s for s in stages}
    for i, (name, kind, shape, params) in enumerate(rows):
        mark = f"  <- {ends[i]}" if i in ends else ""
        print(f"{name:<24}{kind:<20}{shape:<22}{params:>12,}{mark}")
    total = sum(p.numel() for p in model.parameters())
    flops = counter.get_total_flops()
    unit, scale = ("G", 1e9) if flops >= 1e9 else ("M", 1e6)
    print(f"parameters: {total:,}")
    print(
        f"FLOPs for one 3 x {image_size} x {image_size} image: {flops / scale:.2f} {unit} "
        f"({flops / 2 / scale:.2f} {unit} multiply-adds)"
    )


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "vgg16"
    if arch not in ARCHS:
        sys.exit(f"model.py: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    print_summary(ARCHS[arch](), 224, STAGES[arch])
