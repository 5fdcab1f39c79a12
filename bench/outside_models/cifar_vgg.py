"""An outside-style CIFAR-10 classifier: a small VGG-style network written the way a user might write
their own model, not one of nad-guard's reference networks. It exists to test nad-guard on a model the
project did not design for (issue 19): plain conv-BN-ReLU stages in one ``nn.Sequential`` with
max-pooling, global average pooling and a linear head; no residual connections, names unlike the
reference ResNet's (``stages.3.conv`` rather than ``layer2.0``).

``cifar_vgg()`` is the factory a user names on the command line (``--model cifar_vgg:cifar_vgg`` with
this folder on ``PYTHONPATH``): it builds the network and loads its own weights from
``cifar_vgg.safetensors`` beside this file, trained by ``train_cifar_vgg.py`` (record in
``cifar_vgg.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nad_guard.models import InputSpec, from_module

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "cifar_vgg.safetensors"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WIDTHS = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256)


class ConvUnit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SmallVGG(nn.Module):
    def __init__(self, widths=WIDTHS, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        units, cin = [], 3
        for w in widths:
            if w == "M":
                units.append(nn.MaxPool2d(2))
            else:
                units.append(ConvUnit(cin, int(w)))
                cin = int(w)
        self.stages = nn.Sequential(*units)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


SPEC = dict(channels=3, height=32, width=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def cifar_vgg(weights: str | Path | None = WEIGHTS):
    """The network as a nad-guard ``Classifier`` with the trained weights (``cifar_vgg.safetensors`` beside
    this file); ``weights=None`` gives it untrained (what ``train_cifar_vgg.py`` starts from)."""
    from safetensors.torch import load_file

    net = SmallVGG()
    if weights is not None:
        net.load_state_dict(load_file(str(weights)))
    return from_module(net, InputSpec(**SPEC, class_names=list(CLASSES)), "cifar-vgg")
