"""NND's use 2: run the decoupled network with the channels its hard gates close actually skipped.

Implemented for the CIFAR ResNets of :mod:`nad_guard.models` (:class:`~nad_guard.models.CifarResNet`, e.g.
``cifar10-resnet20``), with gate points among the stem's ``relu``, every block's output (``layer1.0``, the
guard's gate points) and every block's inner channels (``layer1.0.bn1``: the first batch norm's output,
before the ReLU), in execution order. A closed channel is zero, so

- a block output's closed channel: the block's second convolution computes only the open output channels
  (its weight rows are selected) and the shortcut is added to those only; the next block's first
  convolution reads only the open input channels (its weight columns are selected);
- an inner closed channel: the block's first convolution computes only the open inner channels, and its
  second convolution reads only those;
- the stem's closed channels: the stem convolution computes only the open ones.

Every gate is computed from what comes before its layer (:mod:`nad_guard.encoder.model`), so nothing is
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

from nad_guard.runinfo import median_seconds
from nad_guard.encoder.boost import BoostedResNet
from nad_guard.encoder.model import ArchitectureEncoder
from nad_guard.hooks import pool
from nad_guard.models import BasicBlock, CifarResNet


def _layout(net: CifarResNet) -> list[str]:
    """Every gate point channel skipping knows, in execution order: the stem's ``relu``, then for every block
    its inner channels (``<block>.bn1``) and its output (``<block>``)."""
    names = ["relu"]
    for i in (1, 2, 3):
        for j in range(len(getattr(net, f"layer{i}"))):
            names += [f"layer{i}.{j}.bn1", f"layer{i}.{j}"]
    return names


def check_skippable(encoder: ArchitectureEncoder) -> CifarResNet:
    """The encoder's network if :func:`skip_forward` can run it, else ``ValueError`` saying why."""
    net = encoder.classifier.net
    if not isinstance(net, CifarResNet):
        raise ValueError(f"channel skipping is implemented for the CIFAR ResNets (cifar10-resnet20), "
                         f"not {type(net).__name__}")
    known = _layout(net)
    if any(n not in known for n in encoder.names) or sorted(encoder.names, key=known.index) != encoder.names:
        raise ValueError(f"channel skipping needs gate points among {known[:3]}... in that order, the encoder has "
                         f"{encoder.names}")
    return net


def _bn(h: torch.Tensor, bn: nn.BatchNorm2d, idx: torch.Tensor | None) -> torch.Tensor:
    sel = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
    return F.batch_norm(h, sel(bn.running_mean), sel(bn.running_var), sel(bn.weight), sel(bn.bias),
                        False, 0.0, bn.eps)


def _scatter(part: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    full = part.new_zeros(part.shape[0], channels, *part.shape[2:])
    full[:, idx] = part
    return full


class _Run:
    """The gates of one skipping pass, in execution order: each from the pooled output of the gate point before
    it (the image for the first), as in :meth:`ArchitectureEncoder.forward`."""

    def __init__(self, encoder: ArchitectureEncoder, z: torch.Tensor):
        self.encoder, self.k, self.last = encoder, 0, pool(z)

    def gated(self, name: str) -> bool:
        return self.k < len(self.encoder.names) and self.encoder.names[self.k] == name

    def open(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard gates ``(N, C)`` of the next gate point and the union of their open channels (indices)."""
        m = (self.encoder.controls[self.k](self.last) > 0).to(self.last.dtype)
        self.k += 1
        return m, m.amax(0).nonzero().flatten()

    def seen(self, part: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> None:
        """The gated output (open channels ``idx`` only) is the next gate's input: pooled, zero elsewhere."""
        self.last = m.new_zeros(m.shape).index_copy(1, idx, pool(part))


def _block(run: _Run, name: str, block: BasicBlock, x: torch.Tensor, idx_in: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    c1, c2 = block.conv1, block.conv2
    every = torch.arange(c1.out_channels, device=x.device)
    mi, idx1 = run.open() if run.gated(f"{name}.bn1") else (None, every)
    h = F.conv2d(x.index_select(1, idx_in), c1.weight.index_select(0, idx1).index_select(1, idx_in), None,
                 c1.stride, c1.padding)
    h = _bn(h, block.bn1, idx1)
    if mi is not None:
        h = h * mi.index_select(1, idx1)[:, :, None, None]
        run.seen(h, mi, idx1)
    h = torch.relu(h)
    mo, idx = run.open() if run.gated(name) else (None, every)
    h = _bn(F.conv2d(h, c2.weight.index_select(0, idx).index_select(1, idx1), None, c2.stride, c2.padding),
            block.bn2, idx)
    out = torch.relu(h + block.shortcut(x).index_select(1, idx))
    if mo is not None:
        out = out * mo.index_select(1, idx)[:, :, None, None]
        run.seen(out, mo, idx)
    return _scatter(out, idx, c2.out_channels), idx


@torch.no_grad()
def _skip_batch(encoder: ArchitectureEncoder, net: CifarResNet, x: torch.Tensor) -> torch.Tensor:
    z = encoder.classifier.normalize(x)
    run = _Run(encoder, z)
    stem = net.conv1
    m, idx = run.open() if run.gated("relu") else (None, torch.arange(stem.out_channels, device=x.device))
    h = torch.relu(_bn(F.conv2d(z, stem.weight.index_select(0, idx), None, stem.stride, stem.padding), net.bn1, idx))
    if m is not None:
        h = h * m.index_select(1, idx)[:, :, None, None]
        run.seen(h, m, idx)
    full = _scatter(h, idx, stem.out_channels)
    for i, layer in enumerate((net.layer1, net.layer2, net.layer3), 1):
        for j, block in enumerate(layer):
            full, idx = _block(run, f"layer{i}.{j}", block, full, idx)
    return net.fc(torch.flatten(net.pool(full), 1))


def skip_forward(encoder: ArchitectureEncoder, x: torch.Tensor, group: str = "image") -> torch.Tensor:
    """Logits ``(N, K)`` of the decoupled network with closed channels skipped (``group``: see above)."""
    net = check_skippable(encoder)
    if group == "union":
        return _skip_batch(encoder, net, x)
    if group == "image":
        return torch.cat([_skip_batch(encoder, net, xi) for xi in x.split(1)])
    raise ValueError(f"group must be 'image' or 'union', got {group!r}")


def _topk_block(block: BasicBlock, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One block with image ``n``'s inner channels ``idx[n]`` only: ``group``'s images as the groups of one
    grouped convolution (one group per image, each with its own weight rows/columns)."""
    n, c1, c2 = len(h), block.conv1, block.conv2
    k, flat = idx.shape[1], idx.reshape(-1)
    w1 = c1.weight.index_select(0, flat)  # (n*k, C_in, 3, 3)
    a = F.conv2d(h.reshape(1, -1, *h.shape[2:]), w1, None, c1.stride, c1.padding, 1, n)
    bn = block.bn1
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt())
    shift = bn.bias - bn.running_mean * scale
    a = torch.relu(a * scale[flat][None, :, None, None] + shift[flat][None, :, None, None])
    w2 = c2.weight[:, idx].transpose(0, 1).reshape(n * c2.out_channels, k, *c2.weight.shape[2:])
    out = F.conv2d(a, w2, None, c2.stride, c2.padding, 1, n).reshape(n, c2.out_channels, *a.shape[2:])
    return torch.relu(block.bn2(out) + block.shortcut(h))


@torch.no_grad()
def _topk_batch(model: BoostedResNet, z: torch.Tensor, grouped: bool) -> torch.Tensor:
    h = model.stem(z)
    for i, b in enumerate(model.blocks):
        idx = model.scores(i, h).topk(model.k[i], dim=1).indices
        if grouped:
            h = _topk_block(b, h, idx)
            continue
        idx = idx[0]  # one image
        a = torch.relu(_bn(F.conv2d(h, b.conv1.weight.index_select(0, idx), None, b.conv1.stride, b.conv1.padding),
                           b.bn1, idx))
        out = F.conv2d(a, b.conv2.weight.index_select(1, idx), None, b.conv2.stride, b.conv2.padding)
        h = torch.relu(b.bn2(out) + b.shortcut(h))
    return model.head(h)


def skip_forward_topk(model: BoostedResNet, x: torch.Tensor, group: str = "image") -> torch.Tensor:
    """Logits ``(N, K)`` of a :class:`~nad_guard.encoder.BoostedResNet` on ``[0, 1]`` images ``x`` with every
    block's closed inner channels skipped: the first convolution computes only the ``k`` open channels (its
    weight rows are selected) and the second reads only those (its weight columns). ``group``: ``image`` runs
    each image alone (batch-1 passes); ``grouped`` runs the batch in one pass, each block's convolutions as
    grouped convolutions with one group per image and that image's own weight rows/columns (the same FLOPs per
    image). Equals the masked forward (``model(normalize(x))``) up to floating-point summation order."""
    z = model.original.normalize(x)
    if group == "grouped":
        return _topk_batch(model, z, True)
    if group == "image":
        return torch.cat([_topk_batch(model, zi, False) for zi in z.split(1)])
    raise ValueError(f"group must be 'image' or 'grouped', got {group!r}")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them
    (convolutions and matrix products; element-wise operations are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def wall_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls (:func:`nad_guard.runinfo.median_seconds`)."""
    return median_seconds(fn, repeats, warmup)