"""What the baselines read: pooled activations and logits of images (:class:`Features`), which modules
to read them from (:func:`default_layers`), and their extraction in one hooked forward pass per batch
(:func:`extract_features`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nad_guard.data import ImageSet
from nad_guard.hooks import capture

ImagesLike = ImageSet | torch.Tensor


@dataclass
class Features:
    """Pooled activations and logits of ``N`` images.

    Attributes:
        layers: module name -> ``(N, C)`` float32 array (global-average-pooled for 4-D outputs,
            token-averaged for 3-D, as is for 2-D), in extraction order.
        logits: ``(N, K)`` float32 array, or ``None``.
    """

    layers: dict[str, np.ndarray]
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.layers = {k: np.asarray(v, dtype=np.float32) for k, v in self.layers.items()}
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float32)
        sizes = {len(v) for v in self.layers.values()} | ({len(self.logits)} if self.logits is not None else set())
        if len(sizes) > 1:
            raise ValueError(f"features disagree on the number of samples: {sorted(sizes)}")
        if any(v.ndim != 2 for v in self.layers.values()):
            raise ValueError("each layer's features must be (N, C)")

    def __len__(self) -> int:
        for v in self.layers.values():
            return len(v)
        return 0 if self.logits is None else len(self.logits)

    def subset(self, index: Any) -> "Features":
        idx = np.asarray(index)
        return Features({k: v[idx] for k, v in self.layers.items()},
                        None if self.logits is None else self.logits[idx])

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        """Stack features of the same layers along samples."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = list(parts[0].layers)
        if any(list(p.layers) != names for p in parts):
            raise ValueError("features to concatenate must have the same layers")
        logits = None if any(p.logits is None for p in parts) else np.concatenate([p.logits for p in parts])
        return Features({k: np.concatenate([p.layers[k] for p in parts]) for k in names}, logits)

    def predictions(self) -> np.ndarray:
        """The classifier's predicted labels (argmax of the logits)."""
        if self.logits is None:
            raise ValueError("these features carry no logits, so no predictions")
        return self.logits.argmax(1)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (layer order kept in its metadata)."""
        import json

        from safetensors.numpy import save_file

        arrays = {f"layer/{k}": np.ascontiguousarray(v) for k, v in self.layers.items()}
        if self.logits is not None:
            arrays["logits"] = np.ascontiguousarray(self.logits)
        save_file(arrays, str(path), metadata={"layers": json.dumps(list(self.layers))})

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            names = json.loads(f.metadata()["layers"])
            layers = {k: f.get_tensor(f"layer/{k}") for k in names}
            logits = f.get_tensor("logits") if "logits" in f.keys() else None
        return cls(layers, logits)


def default_layers(model: nn.Module) -> list[str]:
    """Module names (relative to ``model``) whose pooled outputs the baselines read by default.

    * the MNIST reference CNN: the ReLU after each of its 4 convs and the 128-unit head ReLU;
    * the CIFAR ResNet-20: the stem ReLU and the 9 residual blocks (``net.layer1.0`` ...);
    * torchvision ResNets: ``net.layer1`` ... ``net.layer4``;
    * anything else: every ``nn.ReLU`` module (each must run once per forward pass).
    """
    from nad_guard.models import CifarResNet, MnistCNN

    net = getattr(model, "net", model)
    prefix = "net." if net is not model else ""
    if isinstance(net, MnistCNN):
        return [prefix + n for n in ("features.2", "features.5", "features.9", "features.12", "classifier.3")]
    if isinstance(net, CifarResNet):
        return [prefix + "relu"] + [f"{prefix}layer{i}.{j}" for i in (1, 2, 3) for j in range(len(net.layer1))]
    if all(hasattr(net, f"layer{i}") for i in (1, 2, 3, 4)):
        return [f"{prefix}layer{i}" for i in (1, 2, 3, 4)]
    relus = [prefix + n for n, m in net.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"no default layers for {type(net).__name__}; pass layer names explicitly "
                         "(see model.named_modules())")
    return relus


def image_batches(images: ImagesLike, batch_size: int) -> Iterator[torch.Tensor]:
    """Float batches of ``images`` (an :class:`ImageSet` or a float ``(N, C, H, W)`` tensor in ``[0, 1]``)."""
    if isinstance(images, ImageSet):
        for x, _ in images.batches(batch_size):
            yield x
        return
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be an ImageSet or a float (N, C, H, W) tensor in [0, 1]")
    for s in range(0, len(images), batch_size):
        yield images[s:s + batch_size].float()


@torch.no_grad()
def extract_features(model: nn.Module, images: ImagesLike, layers: Sequence[str] | None = None, *,
                     batch_size: int = 256, device: str | torch.device = "cpu",
                     progress: bool = False) -> Features:
    """Pooled activations of ``layers`` (default :func:`default_layers`) and logits, in one forward
    pass per batch of ``images`` (an :class:`ImageSet` or float ``(N, C, H, W)`` in ``[0, 1]``).
    Memory of the pass is bounded by ``batch_size``; only the pooled ``(N, C)`` features are kept."""
    from tqdm.auto import tqdm

    layers = list(default_layers(model) if layers is None else layers)
    device = torch.device(device)
    model = model.to(device).eval()
    out: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    logits = []
    total = -(-len(images) // batch_size)
    with capture(model, layers) as store:
        for x in tqdm(image_batches(images, batch_size), total=total, desc="features", disable=not progress,
                      leave=False):
            store.clear()
            logits.append(model(x.to(device)).float().cpu().numpy())
            for n in layers:
                out[n].append(store[n].cpu().numpy())
    if not logits:
        raise ValueError("no images")
    return Features({n: np.concatenate(v) for n, v in out.items()}, np.concatenate(logits))


def labels_of(images: ImagesLike, labels: Any) -> np.ndarray:
    """``labels`` as an array, or, when ``None``, the labels of the :class:`ImageSet` ``images``."""
    if labels is None:
        if isinstance(images, ImageSet):
            return images.labels.numpy()
        raise ValueError("labels are required when images is a tensor")
    return np.asarray(labels)

