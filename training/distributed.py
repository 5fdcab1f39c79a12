"""What the training loops share to run unchanged under ``torchrun`` (one process or several).

:func:`session` resolves the device, joins a process group when launched by ``torchrun`` and keeps the
classifier on the device for the block; :class:`Ranks` says which rank this is and sums tensors over
ranks; :func:`permutation` gives every rank the same seeded order of the training images.
(``training/paths.py`` and ``training/encoder.py`` use them.)
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from nad_guard.models import Classifier, resolve_device


@dataclass
class Ranks:
    """This process's rank among ``world`` (1 without torchrun); ``sum_`` all-reduces a tensor in place, ``shard``
    takes this rank's slice ``idx[rank::world]`` of a global batch."""

    rank: int = 0
    world: int = 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank::self.world]


@contextmanager
def session(classifier: Classifier, device: str) -> Iterator[tuple[Ranks, torch.device]]:
    """Resolve ``device``, join a ``torchrun`` process group if launched by one (and leave it after),
    and keep ``classifier`` on the device for the block (moved back afterwards)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Ranks()
    home = classifier.mean.device
    classifier.to(dev)
    try:
        yield ranks, dev
    finally:
        classifier.to(home)
        if created:
            dist.destroy_process_group()


def permutation(n: int, *key: int) -> torch.Tensor:
    """A fixed permutation of ``range(n)`` for a key such as ``(seed, epoch)``."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def load_checkpoint(directory: str | Path | None, name: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The training state saved as ``name`` in ``directory`` (None when there is none), refused with the
    settings that differ when it was written with another ``config``."""
    if directory is None or not (Path(directory) / name).is_file():
        return None
    path = Path(directory) / name
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if state.get("config") != config:
        old = state.get("config") or {}
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                         "use another checkpoint directory or delete it")
    return state


def save_checkpoint(directory: str | Path | None, name: str, state: dict[str, Any], ranks: Ranks) -> None:
    """Write ``state`` as ``name`` in ``directory`` atomically (a temporary file, then a rename), on rank 0 only."""
    if directory is None or ranks.rank != 0:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / name)
