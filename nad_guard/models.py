"""Classifiers: one wrapper that carries input size, channels, normalisation and class names.

:class:`Classifier` takes images as float ``(N, C, H, W)`` in ``[0, 1]`` and returns logits
``(N, K)``; it normalises inside ``forward``, so torchattacks and the detectors never see
normalised inputs. It wraps

* the reference networks (:func:`mnist_cnn`, :func:`resnet20`) and their committed weights
  (:func:`load_reference`),
* any torchvision classification model by name with a user-supplied weights file
  (:func:`torchvision_classifier`),
* a user's own ``nn.Module`` or a TorchScript file (:func:`from_module`, :func:`load_torchscript`).

:func:`build_classifier` is the one way a model's *name* (``--model`` on every command) becomes a
classifier: a reference model, a torchvision architecture, ``package.module:function`` (a factory
the user writes) or the path of an exported program (``.pt2``) or TorchScript file. A classifier built
from a factory or a graph file carries :attr:`Classifier.source`, which a guard records
(:func:`nad_guard.guard.classifier_reference`) so that it can be rebuilt from the guard directory alone.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: never arbitrary
unpickling.
"""

from __future__ import annotations

import hashlib
import importlib
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


def _load_into(net: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
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
    _load_into(model.net, load_state_dict_file(path), str(path))
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
        _load_into(net, load_state_dict_file(weights), str(weights))
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return Classifier(net, InputSpec(channels, input_size, input_size, tuple(mean), tuple(std), names), arch)


def from_module(net: nn.Module, spec: InputSpec, name: str = "custom") -> Classifier:
    """Wrap a user's ``nn.Module`` (which takes normalised input) with its input spec."""
    return Classifier(net, spec, name)


GRAPH_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".jit")  # what build_classifier takes for a graph file


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path: str | Path, spec: InputSpec) -> Classifier:
    """Wrap a saved graph with its input spec: a TorchScript file (``torch.jit.save``) or an
    exported program (``torch.export.save``, suffix ``.pt2``).

    An exported program is unflattened (``torch.export.unflatten``), so its submodules keep the names
    of the original network and run as modules that can be hooked: gate points are named with
    ``--layers`` (their types are gone, so they are not found automatically; see
    :func:`exported_activation_layers`). A TorchScript module cannot be hooked at all: it serves as a
    plain classifier, but paths cannot be learned for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    exported = path.suffix == ".pt2"
    try:
        if exported:
            program = torch.export.load(str(path))
            try:
                net = torch.export.unflatten(program)
            except Exception:  # a program unflatten cannot restore: one graph, still a classifier
                net = program.module()
        else:
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        kind = "an exported program (.pt2)" if exported else "TorchScript"
        raise ValueError(f"cannot load {path} as {kind}: {e}") from e
    fmt = "export" if exported else "torchscript"
    source = {"builder": "graph", "format": fmt, "path": str(path.resolve()), "sha256": file_sha256(path)}
    return Classifier(net, spec, f"{fmt}:{path.name}", source)


ACTIVATION_OPS = ("relu", "gelu", "silu", "hardswish", "hardtanh", "elu", "selu", "celu", "mish", "prelu")


def exported_activation_layers(clf: Classifier) -> list[str]:
    """Names of the leaf submodules of an exported program (:func:`load_torchscript`) whose graph
    applies an activation function: candidates for ``--layers``, which nad-guard cannot choose by type
    in an exported program. Empty for any other network."""
    if (clf.source or {}).get("format") != "export":
        return []
    found = []
    for name, m in clf.net.named_modules():
        graph = getattr(m, "graph", None)
        if not name or graph is None or any(True for _ in m.children()):
            continue
        ops = [getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in graph.nodes
               if n.op == "call_function"]  # aten ops: 'relu.default', 'relu_.default', 'leaky_relu.default'
        if any(a in op for op in ops for a in ACTIVATION_OPS):
            found.append(name)
    return found


def graph_layers_problem(clf: Classifier, layers: Sequence[str] | None) -> str | None:
    """Why paths cannot be learned for a graph-file classifier as asked, in words for the command line,
    or ``None``: a TorchScript module cannot be hooked at all; an exported program's gate points must
    be named (``layers``), and the message suggests its activation modules."""
    src = clf.source or {}
    fmt, model = src.get("format"), src.get("model") or Path(src.get("path", clf.name)).name
    if fmt == "torchscript":
        return (f"{model} is TorchScript, whose modules cannot be hooked, so no paths can be learned for it: "
                "save it with torch.export.save (a .pt2 exported program) or name a factory "
                "(--model package.module:function)")
    if fmt == "export" and not layers:
        found = exported_activation_layers(clf)
        example = (f"e.g. --layers {','.join(found)} (its activation modules)" if found else
                   "modules called once per forward whose output is (N, C, H, W)")
        return (f"{model} is an exported program: it keeps its modules' names but not their types, so nad-guard "
                f"does not choose its gate points by itself; name them with --layers, {example}")
    return None


def classifier_from_factory(ref: str) -> Classifier:
    """Call the user's factory ``package.module:function`` (no arguments); it must return a
    :class:`Classifier` (its weights loaded, or replaced afterwards by ``--weights`` or a guard's stored
    weights). ``ValueError`` says what is wrong, and for a module that cannot be imported, to put the
    folder that holds it on ``PYTHONPATH``. The classifier's :attr:`~Classifier.source` records ``ref``."""
    module, _, func = ref.partition(":")
    if not module or not func:
        raise ValueError(f"{ref!r} must look like package.module:function")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module!r} for {ref!r} ({e}); put the folder that holds it on "
                         "PYTHONPATH, e.g. PYTHONPATH=path/to/folder nad-guard ... (or bentoml serve ...)") from e
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"{module!r} has no function {func!r} (for {ref!r})")
    clf = fn()
    if not isinstance(clf, Classifier):
        raise ValueError(f"{ref} returned {type(clf).__name__}, not a nad_guard Classifier")
    clf.source = {"builder": "factory", "factory": ref}
    return clf


def parse_floats(text: str | Sequence[float] | None, what: str = "value") -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` (or a sequence of numbers) -> ``(0.5, 0.5, 0.5)``; ``None`` stays ``None``."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(v) for v in parts if str(v).strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, one per channel, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def weights_normalisation(weights: str | Path | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from a safetensors weights file's own metadata (``"mean"`` and ``"std"``, each a
    JSON list or comma-separated numbers), or ``None`` when the file says nothing."""
    if weights is None or Path(weights).suffix != ".safetensors" or not Path(weights).is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {weights}: {e}") from e
    if "mean" not in meta or "std" not in meta:
        return None
    values = []
    for key in ("mean", "std"):
        raw = meta[key].strip()
        values.append(parse_floats(json.loads(raw) if raw.startswith("[") else raw, f"{weights} metadata {key!r}"))
    return values[0], values[1]


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} needs {channels} values (one per channel) or one for all, got {len(values)}")
    return values


def is_graph_file(model: str) -> bool:
    """Whether ``--model`` names a graph file (an exported program or TorchScript) by its suffix."""
    return Path(model).suffix in GRAPH_SUFFIXES


def build_classifier(model: str, weights: str | Path | None = None, *, class_names: Sequence[str],
                     input_size: int, channels: int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Classifier:
    """The one way the project turns a model's name (``--model``) into a :class:`Classifier`:

    * a reference model (:data:`REFERENCE_MODELS`; its bundled weights unless ``weights``);
    * a torchvision architecture (sized to ``class_names`` and ``input_size``; random weights unless
      ``weights``), normalised with ``mean``/``std``, else those in the safetensors weights file's
      metadata (:func:`weights_normalisation`), else ImageNet's;
    * the path of an exported program (``.pt2``) or TorchScript file (suffix in :data:`GRAPH_SUFFIXES`),
      whose input spec is the data's: ``channels`` x ``input_size`` x ``input_size``, ``class_names``,
      and ``mean``/``std`` when given, else none (mean 0, std 1: the graph gets ``[0, 1]`` pixels, as
      a deployed graph that does its own preprocessing expects);
    * ``package.module:function`` (:func:`classifier_from_factory`), whose classifier brings its own spec.

    ``weights`` (safetensors or a weights-only torch checkpoint) replace the model's weights.
    ``mean``/``std`` (one value per channel, or one for all) apply to torchvision models and graph
    files only; for the others they are an error, not silently ignored."""
    import torchvision

    mean, std = parse_floats(mean, "mean"), parse_floats(std, "std")
    if (mean is None) != (std is None):
        raise ValueError("give --mean and --std together")
    norm_given = mean is not None
    if model in REFERENCE_MODELS:
        if norm_given:
            raise ValueError(f"--mean/--std apply to torchvision models and .pt2/TorchScript files; {model} "
                             "normalises as it was trained")
        if weights is None:
            return load_reference(model)
        clf = REFERENCE_MODELS[model](class_names)
    elif model in torchvision.models.list_models(module=torchvision.models):
        if not norm_given:
            mean, std = weights_normalisation(weights) or (IMAGENET_MEAN, IMAGENET_STD)
        return torchvision_classifier(model, len(class_names), weights, input_size=input_size,
                                      mean=_per_channel(mean, 3, "--mean"), std=_per_channel(std, 3, "--std"),
                                      class_names=class_names)
    elif is_graph_file(model):
        c = channels or 3
        mean, std = (mean, std) if norm_given else ((0.0,), (1.0,))
        spec = InputSpec(c, input_size, input_size, _per_channel(mean, c, "--mean"), _per_channel(std, c, "--std"),
                         list(class_names))
        clf = load_torchscript(model, spec)
    elif ":" in model:
        if norm_given:
            raise ValueError(f"--mean/--std apply to torchvision models and .pt2/TorchScript files; the "
                             f"classifier {model} returns carries its own input spec")
        clf = classifier_from_factory(model)
    else:
        raise ValueError(f"unknown model {model!r}: use a reference model ({', '.join(REFERENCE_MODELS)}), "
                         "a torchvision architecture, package.module:function, or the path of a .pt2 "
                         "exported program or TorchScript file")
    if weights is not None:
        _load_into(clf.net, load_state_dict_file(weights), str(weights))
    return clf


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
