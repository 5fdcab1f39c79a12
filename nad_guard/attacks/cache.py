"""Identity and cache keys of attack results: :func:`model_hash`, :func:`data_hash`,
:func:`cache_key` and where the cache lives, :func:`default_cache_dir`.

A key hashes ``CACHE_FORMAT``, the model's name, input spec and state-dict tensors, the images and
labels, the attack name, the spec's fields, the batch size and torchattacks' version: stored bytes
and settings, no module path or class ``__module__``/qualname, so moving this code does not change
keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torchattacks
from torch import nn

from nad_guard.attacks.suites import AttackSpec
from nad_guard.data import ImageSet

CACHE_FORMAT = 1  # part of every cache key: bump it when an attack implementation of this package changes


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's name, input spec (if any) and every state-dict tensor."""
    h = hashlib.sha256()
    h.update(str(getattr(model, "name", type(model).__name__)).encode())
    spec = getattr(model, "spec", None)
    if spec is not None:
        h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        _hash_tensor(h, k, v)
    return h.hexdigest()


def data_hash(images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """sha256 of the images (``uint8`` for an :class:`ImageSet`, else float32) and labels."""
    h = hashlib.sha256()
    if isinstance(images, ImageSet):
        _hash_tensor(h, "images", images.images)
        _hash_tensor(h, "labels", images.labels)
    else:
        _hash_tensor(h, "images", images.float())
        _hash_tensor(h, "labels", torch.as_tensor(labels).long())
    return h.hexdigest()


def cache_key(model_id: str, data_id: str, attack: str, spec: AttackSpec, batch_size: int) -> str:
    """The key of one result: model and data identity, attack name and settings, batch size."""
    payload = {"format": CACHE_FORMAT, "model": model_id, "data": data_id, "attack": attack,
               "spec": spec.to_dict(), "batch_size": int(batch_size), "torchattacks": torchattacks.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$NAD_GUARD_CACHE/attacks`` (default ``~/.cache/nad-guard/attacks``)."""
    from nad_guard.data import cache_dir

    return cache_dir() / "attacks"
