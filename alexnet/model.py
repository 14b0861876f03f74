"""AlexNet: the paper's two-GPU network on one GPU, its convolutions whole, its classifier halved.

Paper: A. Krizhevsky, I. Sutskever, G. E. Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NeurIPS 2012.
https://papers.nips.cc/paper/4824-imagenet-classification-with-deep-convolutional-neural-networks

Deliberate deviations, each with its reason:
- conv1 zero-pads its 224 x 224 input by one pixel on the top/left and two on the
  bottom/right, so that (224 + 3 - 11) / 4 + 1 = 55 as in the paper's figure.
- The convolutions have the kernels of both GPUs together (96/256/384/384/256, the paper's
  Figure 2); conv3, conv4 and conv5 use stride 1 and padding 1, which keeps their 13 x 13 maps
  as in that figure (with stride 2 and no padding they would shrink to 6, 2 and nothing).
- No local response normalisation: later work (VGG, section 4.1) found it does not help, and
  it costs time and memory.
- The fully connected layers have 2048 units, one GPU's half of the paper's 4096: a quarter
  of the classifier's weights, for 5 classes and a few thousand photos.
- An adaptive average pool before the classifier keeps the 6 x 6 map at 224 x 224 (where it
  does nothing) and lets other image sizes through, as torchvision's AlexNet does.
- Initialisation: kaiming normal for the convolutions and normal(0, 0.01) for the linear
  layers, zero biases, instead of the paper's normal(0, 0.01) with biases of 1 in some layers:
  the paper's scheme starts far slower without its 90-epoch schedule.
Its layer sizes differ from torchvision's AlexNet (64/192/384/256/256 kernels, 4096 units),
so torchvision's ImageNet weights do not fit this model. 28,868,968 parameters with 1000
classes.

    $ python alexnet/model.py    # layer table, parameters and FLOPs for a 224 x 224 image
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class AlexNet(nn.Module):
    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.5, init_weights: bool = True
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ZeroPad2d((1, 2, 1, 2)),  # left, right, top, bottom
            nn.Conv2d(3, 96, kernel_size=11, stride=4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 2048),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(2048, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.features(x)
        # N x 256 x 6 x 6 (conv1 55 x 55, pool 27, conv2 27, pool 13, conv3-5 13, pool 6)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 9216
        return self.classifier(x)
        # N x num_classes


# The outputs predict.py --feature-maps draws, per architecture: each convolution, after its
# ReLU (conv1 to conv5).
STAGES = {"alexnet": ["features.2", "features.5", "features.8", "features.10", "features.12"]}


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
    print_summary(AlexNet(), 224, STAGES["alexnet"])
