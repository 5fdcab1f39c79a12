"""Gate points: the modules of a classifier whose output gets one gate per channel.

:func:`discover_gate_points` chooses them by the network's structure (:mod:`nad_guard.paths.discovery`:
block outputs, activations after convolutions), or checks the names given, and says how much of the
network's depth they cover (:class:`GateDiscovery`, with a :class:`GateCoverageWarning` when that is
little); :func:`find_gate_points` returns just the points. :func:`apply_gate` multiplies a gate point's
output channel-wise by a gate, which is how :mod:`training.paths` learns the class sub-architectures
and how a class subnetwork is run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from nad_guard.models import Classifier
from nad_guard.paths.discovery import (MIN_CHANNELS, NetworkTrace, find_blocks, module_order_depth, structural_points,
                                       trace_network)

MIN_GATE_POINTS = 3    # fewer gate points than this: warned
MIN_COVERAGE = 0.25    # the deepest gate point before this share of the conv/linear layers: warned


@dataclass(frozen=True)
class GatePoint:
    """A module (named as in ``net.named_modules()``) whose output gets one gate per channel.

    ``size``: the output's spatial size (``(H, W)`` for a convolutional layer; ``()`` for ``(N, C)``) at the
    classifier's input size. ``kind``: why it was chosen: ``block`` (a residual, inverted-residual, dense or
    other merging block's output), ``activation`` (an activation after a convolution), ``pre-activation``
    (the module whose output goes into such an activation applied functionally), or ``given`` (named, not
    chosen). ``depth``: the convolution and linear layers its output depends on (``None``: unknown).
    """

    name: str
    channels: int
    size: tuple[int, ...] = ()
    kind: str = "given"
    depth: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.channels, "size": list(self.size), "kind": self.kind,
                "depth": self.depth}


class GateCoverageWarning(UserWarning):
    """The gate points are few (fewer than :data:`MIN_GATE_POINTS`) or shallow (the deepest depends on less
    than :data:`MIN_COVERAGE` of the network's convolution and linear layers): the paths will say little."""


@dataclass(frozen=True)
class GateDiscovery:
    """Gate points and how much of the network they cover.

    ``depth``: the network's convolution and linear layers (those the logits depend on, each call counted;
    shortcut convolutions and the head included). ``coverage``: the deepest point's ``depth`` over it.
    ``method``: ``graph`` (the dry forward's autograd graph was read) or ``module order`` (it could not
    be: leaf modules in call order). ``automatic``: the points are the automatic choice (``False`` for
    other named layers). ``skipped``: blocks that could not be gate points, as ``"name (why)"`` (a block
    that runs several times, returns no ``(N, C, H, W)`` tensor, or has too few channels).
    """

    points: tuple[GatePoint, ...]
    depth: int
    method: str
    automatic: bool
    skipped: tuple[str, ...] = ()

    @property
    def coverage(self) -> float:
        deepest = max((p.depth or 0 for p in self.points), default=0)
        return deepest / self.depth if self.depth else 0.0

    @property
    def warning(self) -> str | None:
        """What is weak about these points, in words (``None``: nothing)."""
        problems = []
        if len(self.points) < MIN_GATE_POINTS:
            problems.append(f"only {len(self.points)} gate point{'s' * (len(self.points) != 1)} "
                            f"(fewer than {MIN_GATE_POINTS})")
        if self.depth and self.coverage < MIN_COVERAGE:
            problems.append(f"the deepest gate point depends on {round(self.coverage * self.depth)} of the "
                            f"network's {self.depth} conv/linear layers ({self.coverage:.0%}, under "
                            f"{MIN_COVERAGE:.0%} of its depth)")
        if not problems:
            return None
        how = ("a gate point is a module that runs once and returns (N, C, H, W): a block run several times "
               "(shared weights), or a residual sum or activation computed in a parent's forward (out + x, "
               "F.relu) with no module returning it, cannot be one" if self.automatic else "these are the layers named")
        passed = f"; blocks passed over: {', '.join(self.skipped)}" if self.skipped else ""
        return (f"{' and '.join(problems)}: the class paths will see little of the network ({how}{passed}). "
                "Name modules that run once and return (N, C, H, W), spread over the network, with --layers "
                "(fit-paths) or layers=[...]; docs/paths.md says how points are chosen.")

    def describe(self) -> str:
        """The points as a table, one line each (name, channels, H x W, kind, depth), under a header."""
        how = "chosen automatically" if self.automatic else "as named"
        lines = [f"gate points ({how}, {len(self.points)}; the deepest depends on "
                 f"{round(self.coverage * self.depth)} of {self.depth} conv/linear layers, {self.coverage:.0%}):"]
        width = max((len(p.name) for p in self.points), default=4)
        for p in self.points:
            size = " x ".join(str(s) for s in p.size) or "-"
            depth = "?" if p.depth is None else str(p.depth)
            lines.append(f"  {p.name:<{width}}  {p.channels:>5} ch  {size:>9}  {p.kind:<14}  depth {depth}")
        if self.skipped:
            lines.append(f"  blocks passed over: {', '.join(self.skipped)}")
        return "\n".join(lines)

    def to_meta(self) -> dict[str, Any]:
        """The record kept in an artifact's ``meta.json`` under ``gate_points``."""
        return {"method": self.method, "automatic": self.automatic, "network_depth": self.depth,
                "coverage": round(self.coverage, 4), "points": [p.to_dict() for p in self.points],
                "skipped": list(self.skipped)}


def _unwrap(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(model, Classifier):
        return model.net, model.spec.shape
    if input_shape is None:
        raise ValueError("input_shape (C, H, W) is needed for a plain nn.Module; a Classifier carries its own")
    return model, tuple(input_shape)


def _point(trace: NetworkTrace, name: str, kind: str) -> GatePoint:
    c = trace.modules[name]
    depth = trace.depth_of(c.node) if trace.graph else module_order_depth(trace, name)
    return GatePoint(name, int(c.shape[1]), tuple(int(s) for s in c.shape[2:]), kind, depth)


def discover_gate_points(model: nn.Module, layers: Sequence[str] | None = None, *,
                         input_shape: Sequence[int] | None = None, min_channels: int = MIN_CHANNELS,
                         warn: bool = True) -> GateDiscovery:
    """Gate points of ``model`` (a :class:`Classifier`, whose ``.net`` is inspected, or a plain network
    with ``input_shape`` ``(C, H, W)``) and the depth they cover.

    With ``layers=None`` the points are chosen by structure from one dry forward of zeros
    (:mod:`nad_guard.paths.discovery`): the output of every outermost block (a module whose own forward
    merges two data paths, a residual add, a dense concatenation or an excitation product, and runs a
    convolution; and modules of a block's class), and outside blocks every activation after a
    convolution (possibly through a normalisation); only modules that run once and return
    ``(N, C, H, W)`` with ``C >= min_channels``. Otherwise ``layers`` names the modules: each must run
    exactly once and return ``(N, C, ...)``.

    With ``warn``, a :class:`GateCoverageWarning` says when there are fewer than :data:`MIN_GATE_POINTS`
    points or the deepest depends on less than :data:`MIN_COVERAGE` of the network's conv/linear layers.
    The network is left as it was (its train/eval modes are restored after the dry forward).
    """
    net, shape = _unwrap(model, input_shape)
    if isinstance(net, torch.jit.ScriptModule):
        raise ValueError("a TorchScript model cannot be hooked, so its paths cannot be read; wrap the eager "
                         "nn.Module with its weights instead")
    trace = trace_network(net, shape)
    auto = structural_points(trace, min_channels)
    kinds = dict(auto)
    if layers is None:
        if not auto:
            raise ValueError(f"found no gate points automatically in {type(net).__name__} (no block and no "
                             "activation after a convolution in a module that runs once and returns (N, C, H, W) "
                             f"with C >= {min_channels}); name the layers explicitly")
        names = [n for n, _ in auto]
    else:
        names = list(layers)
        examples = ", ".join([n for n, _ in auto][:8] or [n for n in trace.modules if n][:8])
        for name in names:
            if name not in trace.modules or name == "":
                raise ValueError(f"no module named {name!r} in {type(net).__name__}; valid names include {examples}")
        if len(set(names)) != len(names):
            raise ValueError(f"layer names repeat: {names}")
    points = []
    for name in names:
        c = trace.modules[name]
        if c.calls != 1:
            raise ValueError(f"module {name!r} is called {c.calls} times per forward, it needs exactly one call; "
                             "hook the block that contains it instead")
        if c.shape is None or len(c.shape) < 2:
            raise ValueError(f"module {name!r} does not return a (N, C, ...) tensor")
        points.append(_point(trace, name, kinds.get(name, "given")))
    skipped = find_blocks(trace, min_channels)[1] if trace.graph else []
    found = GateDiscovery(tuple(points), trace.depth, "graph" if trace.graph else "module order",
                          names == [n for n, _ in auto], tuple(skipped))
    if warn and found.warning:
        warnings.warn(found.warning, GateCoverageWarning, stacklevel=2)
    return found


def find_gate_points(model: nn.Module, layers: Sequence[str] | None = None, *,
                     input_shape: Sequence[int] | None = None) -> list[GatePoint]:
    """The points of :func:`discover_gate_points` (same arguments), without the coverage warning."""
    return list(discover_gate_points(model, layers, input_shape=input_shape, warn=False).points)


def apply_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Multiply ``out`` ``(N, C, ...)`` channel-wise by ``gate`` ``(N, C)``."""
    if out.shape[:2] != gate.shape:
        raise ValueError(f"gate of shape {tuple(gate.shape)} does not fit output {tuple(out.shape)}")
    return out * gate.to(out.dtype).view(*gate.shape, *([1] * (out.ndim - 2)))
