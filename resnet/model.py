"""ResNet 18/34/50/101/152 and ResNeXt 50 (32x4d) / 101 (32x8d), with torchvision's names.

Papers: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, https://arxiv.org/abs/1512.03385; S. Xie, R. Girshick, P. Dollar, Z. Tu, K. He,
"Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017,
https://arxiv.org/abs/1611.05431.

Module names, order and shapes are torchvision's, so torchvision's ImageNet state dicts load
with strict=True. Deliberate deviations from the papers, all torchvision's too:
- Bottleneck puts the stride on its 3 x 3 convolution, not on the first 1 x 1 ("ResNet v1.5"):
  about 0.5% better top-1 on ImageNet for a little more compute.
- Shortcuts that change shape use a 1 x 1 convolution and batch norm (the paper's option B).
- zero_init_residual=True starts the last batch norm of each residual branch at zero, so every
  block begins as the identity (Goyal et al., https://arxiv.org/abs/1706.02677). Off by default.
include_top=False leaves out the average pool and the classifier: the forward then returns
the N x C x 7 x 7 feature map, for use as a backbone. resnet34 has 21,797,672 parameters with
1000 classes.

    $ python resnet/model.py            # layer table, parameters and FLOPs of resnet34
    $ python resnet/model.py resnext50_32x4d
"""

import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions and the shortcut (resnet18 and resnet34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (grouped for ResNeXt, strided), 1 x 1 expand, and the shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        include_top: bool = True,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        self.include_top = include_top
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        if include_top:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.relu(self.bn1(self.conv1(x)))
        # N x 64 x 112 x 112
        x = self.maxpool(x)
        # N x 64 x 56 x 56
        x = self.layer1(x)
        # N x 64e x 56 x 56 (e = block.expansion: 1 for BasicBlock, 4 for Bottleneck)
        x = self.layer2(x)
        # N x 128e x 28 x 28
        x = self.layer3(x)
        # N x 256e x 14 x 14
        x = self.layer4(x)
        # N x 512e x 7 x 7
        if not self.include_top:
            return x
        x = torch.flatten(self.avgpool(x), 1)
        # N x 512e
        return self.fc(x)
        # N x num_classes


def resnet18(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, include_top, zero_init_residual)


def resnet34(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, include_top, zero_init_residual)


def resnet50(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, include_top, zero_init_residual)


def resnet101(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, include_top, zero_init_residual)


def resnet152(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, include_top, zero_init_residual)


def resnext50_32x4d(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(
        Bottleneck,
        [3, 4, 6, 3],
        num_classes,
        include_top,
        zero_init_residual,
        groups=32,
        width_per_group=4,
    )


def resnext101_32x8d(
    num_classes: int = 1000, include_top: bool = True, zero_init_residual: bool = False
) -> ResNet:
    return ResNet(
        Bottleneck,
        [3, 4, 23, 3],
        num_classes,
        include_top,
        zero_init_residual,
        groups=32,
        width_per_group=8,
    )


ARCHS = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d)
}


# The outputs predict.py --feature-maps draws, per architecture: the stem, then each stage of
# residual blocks (layer1 to layer4, each at half the resolution of the one before).
STAGES = {arch: ["maxpool", "layer1", "layer2", "layer3", "layer4"] for arch in ARCHS}


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
    arch = sys.argv[1] if len(sys.argv) > 1 else "resnet34"
    if arch not in ARCHS:
        sys.exit(f"model.py: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    print_summary(ARCHS[arch](), 224, STAGES[arch])
