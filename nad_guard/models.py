"""Classifiers: one wrapper that carries input size, channels, normalisation and class names.

:class:`Classifier` takes images as float ``(N, C, H, W)`` in ``[0, 1]`` and returns logits
``(N, K)``; it normalises inside ``forward``, so torchattacks and the detectors never see
normalised inputs. It wraps

* the reference networks (:func:`mnist_cnn`, :func:`resnet20`) and their committed weights
  (:func:`load_reference`),
* any torchvision classification model by name with a user-supplied weights file
  (:func:`torchvision_classifier`),
* a user's own ``nn.Module`` or a TorchScript file (:func:`from_module`, :func:`load_torchscript`).

:func:`nad_guard.model_names.build_classifier` is the one way a model's *name* (``--model`` on every
command) becomes a classifier.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: never arbitrary
unpickling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class InputSpec:
    """What a classifier expects: ``channels`` x ``height`` x ``width`` in [0, 1], and how it normalises."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(**d)


class Classifier(nn.Module):
    """A frozen classifier on ``[0, 1]`` images.

    ``forward(x)``: ``x`` float ``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, K)``. The wrapped
    network is ``self.net``; normalisation is applied first. Parameters are frozen and the module is
    put in eval mode.
    """

    def __init__(self, net: nn.Module, spec: InputSpec, name: str = "custom", source: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.spec = spec
        self.name = name
        # How to build it again when its name alone does not say (reference and torchvision models are
        # known by name): {"builder": "factory", "factory": "pkg.mod:fn"} or {"builder": "graph", "format":
        # "export" | "torchscript", "path": ..., "sha256": ...}; None for a module wrapped by hand.
        self.source = dict(source) if source else None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    @property
    def num_classes(self) -> int:
        return len(self.spec.class_names)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not a float ``(N, C, H, W)`` batch of this model's size."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"expected a float tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.shape:
            raise ValueError(f"expected shape (N, {', '.join(map(str, self.spec.shape))}), got {tuple(x.shape)}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def train(self, mode: bool = True) -> "Classifier":
        # torchattacks toggles modes; a frozen classifier's BatchNorm statistics must never move.
        # Flags are set directly: exported programs refuse ``train()`` calls of any kind.
        for m in self.modules():
            m.training = False
        return self


# --------------------------------------------------------------------------- reference networks

class MnistCNN(nn.Module):
    """Small CNN for 28x28 grey digits: two conv blocks (32, 64 channels) and a 128-unit head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """He et al.'s CIFAR basic block with option-A (zero-padded identity) shortcuts."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2): 16/32/64 channels, n blocks each."""

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            layer = []
            for j in range(n):
                layer.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            blocks.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mnist_cnn(class_names: Sequence[str] | None = None) -> Classifier:
    names = list(class_names or [str(i) for i in range(10)])
    return Classifier(MnistCNN(len(names)), InputSpec(1, 28, 28, MNIST_MEAN, MNIST_STD, names), "mnist-cnn")


def resnet20(class_names: Sequence[str] | None = None) -> Classifier:
    names = list(class_names or CIFAR10_CLASSES)
    return Classifier(CifarResNet(3, len(names)), InputSpec(3, 32, 32, CIFAR10_MEAN, CIFAR10_STD, names),
                      "cifar10-resnet20")


REFERENCE_MODELS = {"mnist-cnn": mnist_cnn, "cifar10-resnet20": resnet20}


# --------------------------------------------------------------------------- weights

def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    return sd


def load_into(net: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load state dict ``sd`` into ``net`` strictly (a DDP ``module.`` prefix removed); ``where`` names its
    file in the error."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {where} do not fit the architecture: {str(e)[:500]}") from e


def reference_record(name: str) -> dict[str, Any]:
    """The JSON training record committed beside a reference model's weights."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no training record {path}; train it with `nad-guard train-reference {name}`")
    return json.loads(path.read_text())


def load_reference(name: str, weights: str | Path | None = None) -> Classifier:
    """A reference classifier with its committed weights (or ``weights`` if given)."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}")
    model = REFERENCE_MODELS[name]()
    path = Path(weights) if weights else WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights {path} not found; train them with `nad-guard train-reference {name}`")
    load_into(model.net, load_state_dict_file(path), str(path))
    return model


TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "vgg16", "mobilenet_v2",
                     "densenet121", "efficientnet_b0", "convnext_tiny")


def torchvision_classifier(arch: str, num_classes: int = 1000, weights: str | Path | None = None,
                           input_size: int = 224, channels: int = 3,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                           class_names: Sequence[str] | None = None) -> Classifier:
    """A torchvision classification model by name (``torchvision.models.get_model``), random weights
    unless a user's ``weights`` file (safetensors or weights-only torch checkpoint) is given. Nothing
    is downloaded."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"{arch!r} is not a torchvision classification model; e.g. {', '.join(TORCHVISION_ARCHS)}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights is not None:
        load_into(net, load_state_dict_file(weights), str(weights))
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return Classifier(net, InputSpec(channels, input_size, input_size, tuple(mean), tuple(std), names), arch)


def from_module(net: nn.Module, spec: InputSpec, name: str = "custom") -> Classifier:
    """Wrap a user's ``nn.Module`` (which takes normalised input) with its input spec."""
    return Classifier(net, spec, name)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


@torch.no_grad()
def accuracy(model: nn.Module, images, batch_size: int = 500, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on an :class:`~nad_guard.data.ImageSet`."""
    model = model.to(device)
    correct = 0
    for x, y in images.batches(batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / max(len(images), 1)
