"""GoogLeNet (Inception v1) as in the paper: no batch norm, 5 x 5 branches, two auxiliary heads.

Paper: C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015.
https://arxiv.org/abs/1409.4842

Follows the paper's Table 1 and section 5: ceil-mode 3 x 3 / 2 max pools, Inception modules
whose fourth branch is a 3 x 3 max pool and a 1 x 1 projection, global average pooling,
dropout 0.4 and one linear layer. The two auxiliary classifiers sit on inception4a and
inception4d: 5 x 5 / 3 average pool, 1 x 1 convolution with 128 kernels, fully connected 1024,
dropout 0.7, linear to the classes; they exist only to help training and are skipped in eval
mode. In training mode the forward returns a GoogLeNetOutputs(logits, aux1, aux2) named tuple.

Deliberate deviations, each with its reason:
- No local response normalisation (as VGG found, it does not help).
- Average pools are adaptive (global for the main head, 4 x 4 after the 5 x 5 / 3 pool in the
  auxiliary heads): at 224 x 224 they are exactly the paper's, and other image sizes still work.
- Initialisation: the paper does not give one (DistBelief). Without batch norm, a 22-layer net
  needs a variance-preserving start, so convolutions get kaiming normal (fan in) and the linear
  layers normal(0, 0.01), biases zero.
torchvision's GoogLeNet adds batch norm and uses 3 x 3 kernels in the "5 x 5" branch, so its
ImageNet weights do not fit this model. With 1000 classes: 6,998,552 parameters without the
auxiliary heads, 13,378,280 with both.

    $ python googlenet/model.py    # layer table, parameters and FLOPs for a 224 x 224 image
"""

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux1: torch.Tensor  # the head on inception4a
    aux2: torch.Tensor  # the head on inception4d


class BasicConv2d(nn.Module):
    """A convolution with its ReLU (the paper has no batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Inception(nn.Module):
    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x))
        return torch.cat(branches, dim=1)


class InceptionAux(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.avgpool = nn.AvgPool2d(kernel_size=5, stride=3)
        self.resize = nn.AdaptiveAvgPool2d((4, 4))  # a no-op at 224 x 224 input
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(p=dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14
        x = self.resize(self.avgpool(x))
        # N x C x 4 x 4
        x = self.conv(x)
        # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        # N x 2048
        x = self.dropout(torch.relu(self.fc1(x)))
        # N x 1024
        return self.fc2(x)
        # N x num_classes


class GoogLeNet(nn.Module):
    def __init__(
        self, num_classes: int = 1000, aux_logits: bool = True, init_weights: bool = True
    ) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes)
            self.aux2 = InceptionAux(528, num_classes)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.4)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        # N x 3 x 224 x 224
        x = self.maxpool1(self.conv1(x))
        # N x 64 x 56 x 56
        x = self.conv3(self.conv2(x))
        # N x 192 x 56 x 56
        x = self.maxpool2(x)
        # N x 192 x 28 x 28
        x = self.inception3b(self.inception3a(x))
        # N x 480 x 28 x 28
        x = self.maxpool3(x)
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        # N x 528 x 14 x 14
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)
        # N x 832 x 14 x 14
        x = self.maxpool4(x)
        # N x 832 x 7 x 7
        x = self.inception5b(self.inception5a(x))
        # N x 1024 x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)
        # N x 1024
        x = self.fc(self.dropout(x))
        # N x num_classes
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(x, aux1, aux2)
        return x


def without_aux(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with exactly the auxiliary heads' entries removed, for an aux-free model.

    Load the result with strict=True: any other mismatch still fails loudly.
    """
    return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}


# The outputs predict.py --feature-maps draws, per architecture: the stem, then the last
# Inception module at each resolution (28, 14 and 7 pixels at 224).
STAGES = {"googlenet": ["maxpool2", "inception3b", "inception4e", "inception5b"]}


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
    print_summary(GoogLeNet(aux_logits=False), 224, STAGES["googlenet"])
    with_aux = sum(p.numel() for p in GoogLeNet(aux_logits=True).parameters())
    print(f"parameters with both auxiliary heads (training): {with_aux:,}")
