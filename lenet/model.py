"""LeNet, as in the PyTorch "Training a Classifier" tutorial, for 3 x 32 x 32 images.

Paper: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-Based Learning Applied to
Document Recognition", Proceedings of the IEEE, 1998. http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf

Deviations from LeNet-5, all the tutorial's and kept on purpose because learners compare with it:
- three colour channels in and 16 / 32 kernels instead of 6 / 16 (CIFAR-10 photos, not digits);
- ReLU and max pooling instead of scaled tanh and trainable sub-sampling;
- full connections between the conv layers (no C3 connection table) and a plain linear output
  instead of the RBF units.
- PyTorch's default initialisation, as in the tutorial.
With 10 classes it has 121,182 parameters.

    $ python lenet/model.py    # layer table, parameters and FLOPs for a 32 x 32 image
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=5)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(32 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 32 x 32
        x = self.pool1(torch.relu(self.conv1(x)))
        # N x 16 x 14 x 14
        x = self.pool2(torch.relu(self.conv2(x)))
        # N x 32 x 5 x 5
        x = torch.flatten(x, 1)
        # N x 800
        x = torch.relu(self.fc1(x))
        # N x 120
        x = torch.relu(self.fc2(x))
        # N x 84
        return self.fc3(x)
        # N x num_classes


# The outputs predict.py --feature-maps draws, per architecture: each convolution.
STAGES = {"lenet": ["conv1", "conv2"]}


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
    print_summary(LeNet(num_classes=10), 32, STAGES["lenet"])
