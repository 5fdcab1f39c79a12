"""Finding a network's natural gate points by its structure: one dry forward pass, read as a graph.

:func:`trace_network` runs one forward pass of zeros (in eval mode, the modes restored afterwards) with
gradients on, and records two things:

- the **autograd graph** of the pass: every operation the logits depend on (``grad_fn`` nodes, in the
  order they ran), what kind of operation it is (convolution, linear layer, normalisation, activation,
  pooling, a reshape, or other) and which earlier operations fed it data (operations that depend on
  the input; parameters and constants are not data);
- every **module call**: when it started and ended (as positions in that order), how often it ran,
  and which graph node and shape its output had.

Reading the autograd graph rather than a ``torch.fx`` symbolic trace works for any forward that runs:
data-dependent control flow, functional calls (``F.relu``, ``out + x``, ``torch.cat``), methods and
containers of any class. :func:`structural_points` then applies the rule (docs/paths.md):

1. **Blocks.** A module is a block when its own forward code (outside its submodules) merges two
   data-dependent tensors (a residual ``add``, a dense ``cat``, a squeeze-excitation ``mul``) and it
   runs at least one convolution; modules of the same class as a block are blocks too (inverted
   residuals without a skip connection, a stage's first block written without a shortcut). Each
   outermost block that runs once and returns an ``(N, C, H, W)`` tensor is a gate point, and nothing
   inside it is; :func:`find_blocks` also names the blocks passed over, and why.
2. **Activations after convolutions.** Outside blocks, every activation whose input comes from a
   convolution (directly, or through one normalisation and reshapes) is a gate point: the innermost
   module that computes it and returns it (an ``nn.ReLU``, or the conv-norm-activation module that
   applies ``F.relu``), or, when no module returns it (an ``F.relu`` in the parent's forward), the module
   whose output goes into it, as a *pre-activation* point. A binary mask commutes with every
   activation ``f`` with ``f(0) = 0``, so the masks mean the same there.
3. Only modules that run exactly once and return ``(N, C, H, W)`` with ``C >= min_channels`` qualify
   (a module run twice cannot carry one gate per call); points come in the order they run.

When the graph cannot be read (the logits have no ``grad_fn``: the forward detaches, or runs under
``torch.no_grad``), :func:`module_order_points` takes every activation module that runs once right
after a convolution module, possibly through a normalisation module, in the order modules were called.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nad_guard.hooks import device_of, hooked

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
MIN_CHANNELS = 8  # fewer channels than this make a poor gate point (and the path features' top-k overlap)

# Autograd node names (without "Backward<n>"): the operations that matter to the rule. Activations are those
# with f(0) = 0 (a sigmoid is a gate, as in squeeze-excitation, not an activation here).
_ACTIVATION_OPS = {"Relu", "Hardtanh", "LeakyRelu", "Prelu", "PreluKernel", "Elu", "Celu", "Gelu", "Silu", "Mish",
                   "Hardswish", "Tanh"}
_LINEAR_OPS = {"Addmm", "Mm", "Linear"}
_RESHAPE_OPS = {"View", "Reshape", "UnsafeView", "Clone", "Expand", "Squeeze", "Unsqueeze", "Permute", "Transpose",
                "Alias", "ToCopy", "Contiguous"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


def op_kind(fn: Any) -> str:
    """The kind of an autograd node: ``conv``, ``linear``, ``norm``, ``act``, ``pool``, ``reshape``,
    ``elementwise`` (add, sub, mul, div), or ``other``."""
    base = re.sub(r"Backward\d*$", "", type(fn).__name__)
    if "Conv" in base:
        return "conv"
    if base in _LINEAR_OPS:
        return "linear"
    if "Norm" in base:
        return "norm"
    if base in _ACTIVATION_OPS:
        return "act"
    if "Pool" in base:
        return "pool"
    if base in _RESHAPE_OPS:
        return "reshape"
    if base in _ELEMENTWISE:
        return "elementwise"
    return "other"


@dataclass
class ModuleCall:
    """What one module did in the dry forward: its calls (``spans``: start and end positions of each, in the
    graph's order), and its first call's output: graph node (``None`` if none) and shape (``None`` if not a
    tensor)."""

    name: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    node: int | None = None
    shape: tuple[int, ...] | None = None

    @property
    def calls(self) -> int:
        return len(self.spans)

    def contains(self, seq: int) -> bool:
        return any(a < seq < b for a, b in self.spans)


@dataclass
class NetworkTrace:
    """One dry forward of a network (see the module docstring). ``ops``: graph node -> kind; ``data_inputs``:
    graph node -> the data nodes feeding it (both only for nodes the logits depend on and that depend on
    the input); ``owner``: graph node -> the innermost module call it ran in (``""``: the network's own
    forward); ``order``: leaf modules in call order; ``graph``: whether the autograd graph could be read."""

    net: nn.Module
    modules: dict[str, ModuleCall]
    order: list[str]
    ops: dict[int, str] = field(default_factory=dict)
    data_inputs: dict[int, list[int]] = field(default_factory=dict)
    owner: dict[int, str] = field(default_factory=dict)
    graph: bool = False
    _ancestors_bits: dict[int, int] | None = field(default=None, repr=False)

    def depth_of(self, node: int | None) -> int | None:
        """How many convolution and linear nodes ``node`` depends on (itself included)."""
        if node is None or node not in self.ops:
            return None
        if self._ancestors_bits is None:
            self._ancestors_bits = self._ancestors()
        return bin(self._ancestors_bits[node]).count("1")

    @property
    def depth(self) -> int:
        """Convolution and linear layers of the network: nodes of those kinds the logits depend on (with the
        module order: convolution and linear modules called)."""
        if self.graph:
            return sum(k in ("conv", "linear") for k in self.ops.values())
        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        return sum(isinstance(self.net.get_submodule(n), kinds) for n in self.order)

    def _ancestors(self) -> dict[int, int]:
        """Graph node -> the set of convolution and linear nodes it depends on, as bits of an int."""
        bits: dict[int, int] = {}
        layer = 0
        for node in sorted(self.ops):
            b = 0
            for p in self.data_inputs[node]:
                b |= bits[p]
            if self.ops[node] in ("conv", "linear"):
                b |= 1 << layer
                layer += 1
            bits[node] = b
        return bits


def trace_network(net: nn.Module, input_shape: tuple[int, ...]) -> NetworkTrace:
    """Run one dry forward of zeros shaped ``(1, *input_shape)`` through ``net`` and record it (see the
    module docstring). ``net`` is left as it was (modes, buffers and parameters). Works inside
    ``torch.no_grad`` and ``torch.inference_mode`` too; if the pass cannot record a graph (say, inference
    tensors among the parameters), it runs without one and the trace has ``graph=False``."""
    params = next((p for p in net.parameters() if p.is_floating_point()), None)
    dtype = params.dtype if params is not None else torch.float32
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.inference_mode(False):
            try:
                with torch.enable_grad():
                    return _traced_pass(net, input_shape, dtype, graph=True)
            except RuntimeError:
                with torch.no_grad():
                    return _traced_pass(net, input_shape, dtype, graph=False)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _traced_pass(net: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype, graph: bool) -> NetworkTrace:
    names = [n for n, _ in net.named_modules()]
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}
    calls = {n: ModuleCall(n) for n in names}
    order: list[str] = []
    probe = torch.zeros((), requires_grad=graph)
    open_at: dict[str, list[int]] = {n: [] for n in names}

    def position() -> int:  # the autograd sequence number the next node would get (-1: not readable)
        with torch.enable_grad():
            node = (probe * 1).grad_fn
        return int(node._sequence_nr()) if node is not None else -1

    def enter(i: int) -> None:
        open_at[names[i]].append(position())

    def leave(i: int, out: Any) -> None:
        c = calls[names[i]]
        c.spans.append((open_at[names[i]].pop(), position()))
        if c.calls == 1 and torch.is_tensor(out):
            c.shape = tuple(out.shape)
            c.node = int(out.grad_fn._sequence_nr()) if out.grad_fn is not None else None
        if names[i] in leaves:
            order.append(names[i])

    leaf = torch.zeros(1, *input_shape, device=device_of(net), dtype=dtype, requires_grad=graph)
    with hooked(net, names, leave, pre=enter):
        x = leaf.clone()
        start = int(x.grad_fn._sequence_nr()) if x.grad_fn is not None else -1  # before the forward changes x
        logits = net(x)
    trace = NetworkTrace(net, calls, order)
    outs = [t for t in (logits.values() if isinstance(logits, dict) else
                        logits if isinstance(logits, (list, tuple)) else [logits]) if torch.is_tensor(t)]
    roots = [t.grad_fn for t in outs if t.grad_fn is not None]
    readable = all(a >= 0 and b >= 0 for c in calls.values() for a, b in c.spans)
    if graph and roots and readable and start >= 0:
        _read_graph(trace, roots, start)
    return trace


def _read_graph(trace: NetworkTrace, roots: list[Any], start: int) -> None:
    kinds: dict[int, str] = {}
    parents: dict[int, list[int]] = {}
    stack = list(roots)
    while stack:
        fn = stack.pop()
        seq = int(fn._sequence_nr())
        if seq in kinds:
            continue
        kinds[seq] = op_kind(fn)
        ps = [g for g, _ in fn.next_functions if g is not None and type(g).__name__ != "AccumulateGrad"]
        parents[seq] = sorted({int(g._sequence_nr()) for g in ps})
        stack.extend(ps)
    data: set[int] = set()
    for seq in sorted(kinds):
        if seq == start or any(p in data for p in parents[seq]):
            data.add(seq)
    if not data:
        return
    trace.ops = {s: kinds[s] for s in sorted(data)}
    trace.data_inputs = {s: [p for p in parents[s] if p in data] for s in trace.ops}
    # the innermost module call each node ran in: sweep the nodes and the calls' starts and ends in order
    events = sorted([(a, 0, n) for n, c in trace.modules.items() for a, _ in c.spans] +
                    [(b, 1, n) for n, c in trace.modules.items() for _, b in c.spans])
    stack_names: list[str] = []
    nodes = sorted(trace.ops)
    j = 0
    for pos, kind, name in events:
        while j < len(nodes) and nodes[j] < pos:
            trace.owner[nodes[j]] = stack_names[-1] if stack_names else ""
            j += 1
        if kind == 0:
            stack_names.append(name)
        elif stack_names:
            stack_names.pop()
    for node in nodes[j:]:
        trace.owner[node] = ""
    trace.graph = True


def _qualifies(c: ModuleCall, min_channels: int) -> bool:
    return (c.calls == 1 and c.name != "" and c.shape is not None and len(c.shape) == 4
            and c.shape[1] >= min_channels)


def find_blocks(trace: NetworkTrace, min_channels: int = MIN_CHANNELS) -> tuple[list[str], list[str]]:
    """The outermost blocks that are gate points (rule 1 of the module docstring), in call order, and the
    outermost blocks passed over outside them, as ``"name (why)"``."""
    mods, ops = trace.modules, trace.ops
    convs = sorted(s for s, k in ops.items() if k == "conv")

    def runs_conv(c: ModuleCall) -> bool:
        return any(bisect_left(convs, a + 1) < bisect_left(convs, b) for a, b in c.spans)

    merges = {trace.owner[s] for s in ops if len(trace.data_inputs[s]) >= 2}
    block_types = {type(trace.net.get_submodule(n)) for n in merges if n and mods[n].calls == 1
                   and runs_conv(mods[n])}
    blocks = [n for n, c in mods.items() if n and runs_conv(c)
              and (n in merges or type(trace.net.get_submodule(n)) in block_types)]
    good = [n for n in blocks if _qualifies(mods[n], min_channels) and mods[n].node in ops]

    def outermost(names: list[str], within: list[str]) -> list[str]:
        return [n for n in names if not any(n.startswith(b + ".") for b in within)]

    units = outermost(good, good)
    others = [n for n in blocks if n not in good]
    skipped = []
    for n in outermost(others, units + others):
        c = mods[n]
        why = (f"runs {c.calls} times" if c.calls > 1 else "returns no tensor" if c.shape is None else
               f"returns shape {c.shape}" if len(c.shape) != 4 else
               f"{c.shape[1]} channels, under {min_channels}" if c.shape[1] < min_channels else
               "its output does not reach the logits")
        skipped.append(f"{n} ({why})")
    return units, skipped


def structural_points(trace: NetworkTrace, min_channels: int = MIN_CHANNELS) -> list[tuple[str, str]]:
    """The automatic gate points of a traced network, ``(module name, kind)`` in the order they run;
    kind is ``block``, ``activation`` or ``pre-activation`` (rule: the module docstring)."""
    if not trace.graph:
        return module_order_points(trace, min_channels)
    mods, ops = trace.modules, trace.ops
    units, _ = find_blocks(trace, min_channels)
    unit_spans = [mods[n].spans[0] for n in units]
    found: dict[str, tuple[int, str]] = {n: (mods[n].node, "block") for n in units}  # name -> (node, kind)

    returns: dict[int, list[ModuleCall]] = {}
    for c in mods.values():
        if c.calls == 1 and c.name != "" and c.node is not None:
            returns.setdefault(c.node, []).append(c)
    for node, kind in ops.items():
        if kind != "act" or any(a < node < b for a, b in unit_spans):
            continue
        if not _follows_conv(trace, node):
            continue
        makers = sorted((c for c in returns.get(node, []) if c.contains(node)), key=lambda c: -c.spans[0][0])
        choice = makers[:1] or returns.get(node, [])[:1]
        kind_name = "activation"
        if not choice:
            choice, kind_name = returns.get(trace.data_inputs[node][0], [])[:1], "pre-activation"
        if choice and _qualifies(choice[0], min_channels) and choice[0].name not in found:
            found[choice[0].name] = (choice[0].node, kind_name)
    return [(n, k) for n, (_, k) in sorted(found.items(), key=lambda item: item[1][0])]


def _follows_conv(trace: NetworkTrace, node: int) -> bool:
    """Whether ``node``'s data input comes from a convolution, through reshapes, elementwise operations with
    one data input (a bias, a scale) and at most one normalisation."""
    inputs, norms = trace.data_inputs[node], 0
    while len(inputs) == 1:
        kind = trace.ops[inputs[0]]
        if kind == "conv":
            return True
        if kind == "norm" and norms == 0:
            norms = 1
        elif kind not in ("reshape", "elementwise"):
            return False
        inputs = trace.data_inputs[inputs[0]]
    return False


def module_order_points(trace: NetworkTrace, min_channels: int = MIN_CHANNELS) -> list[tuple[str, str]]:
    """The fallback rule without a graph: every activation module called once right after a convolution
    module (possibly through a normalisation module), in call order; kind ``activation``."""
    modules = dict(trace.net.named_modules())
    found: list[tuple[str, str]] = []
    for j, name in enumerate(trace.order):
        c = trace.modules[name]
        if not isinstance(modules[name], ACTIVATIONS) or not _qualifies(c, min_channels) or \
                any(n == name for n, _ in found):
            continue
        prev = [modules[n] for n in trace.order[max(0, j - 2):j]]
        if prev and isinstance(prev[-1], nn.modules.conv._ConvNd):
            found.append((name, "activation"))
        elif len(prev) == 2 and isinstance(prev[-1], NORMS) and isinstance(prev[0], nn.modules.conv._ConvNd):
            found.append((name, "activation"))
    return found


def module_order_depth(trace: NetworkTrace, name: str) -> int | None:
    """Without a graph: convolution and linear modules called up to module ``name``'s first call (a leaf)."""
    if name not in trace.order:
        return None
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    upto = trace.order[:trace.order.index(name) + 1]
    return sum(isinstance(trace.net.get_submodule(n), kinds) for n in upto)
