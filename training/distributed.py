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
from typing import Iterator

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
