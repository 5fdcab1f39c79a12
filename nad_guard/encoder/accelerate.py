"""NND's use 2: run the decoupled network with the channels its hard gates close actually skipped.

Implemented for the CIFAR ResNets of :mod:`nad_guard.models` (:class:`~nad_guard.models.CifarResNet`, e.g.
``cifar10-resnet20``) with the gate points its guard uses: the stem's ``relu`` and every residual block.
A closed channel ``c`` of block ``b``'s output is zero, so

- block ``b``'s second convolution computes only the open output channels (its weight rows are selected),
  and the shortcut is added to those channels only;
- block ``b + 1``'s first convolution reads only the open input channels (its weight columns are selected);
- the stem convolution computes only the stem gate's open channels.

The block's inner channels (between its two convolutions) have no gate and are all computed. Every gate is
computed from the layer's input before the layer runs (:mod:`nad_guard.encoder.model`), so nothing is
computed and then thrown away.

``group``: ``image`` runs each image on its own (its own channel selection: the FLOP saving the gates
promise; a loop of batch-1 passes); ``union`` runs the batch at once on the union of its images' open
channels (one pass; saves only the channels every image of the batch closes) and zeroes the rest per image.
The result equals the hard-gated forward (:meth:`ArchitectureEncoder.forward` with ``mode="hard"``) up to
floating-point summation order.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nad_guard.encoder.model import ArchitectureEncoder
from nad_guard.hooks import pool
from nad_guard.models import BasicBlock, CifarResNet


def check_skippable(encoder: ArchitectureEncoder) -> CifarResNet:
    """The encoder's network if :func:`skip_forward` can run it, else ``ValueError`` saying why."""
    net = encoder.classifier.net
    if not isinstance(net, CifarResNet):
        raise ValueError(f"channel skipping is implemented for the CIFAR ResNets (cifar10-resnet20), "
                         f"not {type(net).__name__}")
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(len(getattr(net, f"layer{i}")))]
    if encoder.names != ["relu"] + blocks:
        raise ValueError(f"channel skipping needs the gate points relu + every block ({blocks[:2]}...), "
                         f"the encoder has {encoder.names}")
    return net


def _bn(h: torch.Tensor, bn: nn.BatchNorm2d, idx: torch.Tensor | None) -> torch.Tensor:
    sel = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
    return F.batch_norm(h, sel(bn.running_mean), sel(bn.running_var), sel(bn.weight), sel(bn.bias),
                        False, 0.0, bn.eps)


def _scatter(part: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    full = part.new_zeros(part.shape[0], channels, *part.shape[2:])
    full[:, idx] = part
    return full


def _open(encoder: ArchitectureEncoder, i: int, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard gates ``(N, C)`` of gate point ``i`` and the union of their open channels (indices)."""
    m = (encoder.controls[i](pooled) > 0).to(pooled.dtype)
    return m, m.amax(0).nonzero().flatten()


def _block(block: BasicBlock, x: torch.Tensor, idx_in: torch.Tensor, m: torch.Tensor, idx: torch.Tensor
           ) -> torch.Tensor:
    c1, c2 = block.conv1, block.conv2
    h = F.conv2d(x.index_select(1, idx_in), c1.weight.index_select(1, idx_in), None, c1.stride, c1.padding)
    h = torch.relu(_bn(h, block.bn1, None))
    h = _bn(F.conv2d(h, c2.weight.index_select(0, idx), None, c2.stride, c2.padding), block.bn2, idx)
    out = torch.relu(h + block.shortcut(x).index_select(1, idx)) * m.index_select(1, idx)[:, :, None, None]
    return _scatter(out, idx, c2.out_channels)


@torch.no_grad()
def _skip_batch(encoder: ArchitectureEncoder, net: CifarResNet, x: torch.Tensor) -> torch.Tensor:
    z = encoder.classifier.normalize(x)
    m, idx = _open(encoder, 0, pool(z))
    stem = net.conv1
    h = F.conv2d(z, stem.weight.index_select(0, idx), None, stem.stride, stem.padding)
    h = torch.relu(_bn(h, net.bn1, idx)) * m.index_select(1, idx)[:, :, None, None]
    full = _scatter(h, idx, stem.out_channels)
    i = 1
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            m, idx_out = _open(encoder, i, pool(full))
            full = _block(block, full, idx, m, idx_out)
            idx, i = idx_out, i + 1
    return net.fc(torch.flatten(net.pool(full), 1))


def skip_forward(encoder: ArchitectureEncoder, x: torch.Tensor, group: str = "image") -> torch.Tensor:
    """Logits ``(N, K)`` of the decoupled network with closed channels skipped (``group``: see above)."""
    net = check_skippable(encoder)
    if group == "union":
        return _skip_batch(encoder, net, x)
    if group == "image":
        return torch.cat([_skip_batch(encoder, net, xi) for xi in x.split(1)])
    raise ValueError(f"group must be 'image' or 'union', got {group!r}")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them
    (convolutions and matrix products; element-wise operations are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def wall_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
