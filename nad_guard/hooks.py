"""Reading a network's intermediate outputs: the one place that hooks modules and pools their outputs.

Everything that looks inside a classifier's forward pass (the path model and its training, the guard's
``full`` encoding, the Mahalanobis, LID and deep-kNN baselines, critical paths) uses these helpers, so
that a layer is hooked, checked and pooled the same way everywhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    The count is process-wide, so torch work in other Python threads sees it for the duration.

    :meth:`~nad_guard.paths.PathModel.features` computes the per-row feature arithmetic on one thread.
    Those are about a hundred operations on ``(N, C_l)`` tensors (small matrix products, top-k,
    softmax), and each parallel region costs more to start than it saves. Measured on the 2-core test
    machine with the MNIST guard at 128 rows and ``OMP_WAIT_POLICY=PASSIVE`` (the service's setting),
    :func:`~nad_guard.paths.path_features` took:

    * 4.8 ms on 2 threads, and 1.5-1.7 ms on 1;
    * with the default wait policy: 1.6-1.8 ms on either count.
    """
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def hooked(net: nn.Module, names: Sequence[str], fn: Callable[[int, Any], torch.Tensor | None],
           pre: Callable[[int], None] | None = None) -> Iterator[None]:
    """Attach ``fn(i, output)`` as a forward hook on module ``names[i]`` for the ``with`` block (and
    ``pre(i)``, if given, as a hook that runs when the module is entered).

    A non-``None`` return value of ``fn`` replaces the module's output. The hooks are removed on exit, also
    when the block raises; nothing else about ``net`` changes. An unknown name raises ``ValueError`` naming
    some valid ones.
    """
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in {type(net).__name__}; e.g. "
                         f"{', '.join(list(modules)[1:8])}")
    handles = []
    try:
        for i, name in enumerate(names):
            if pre is not None:
                handles.append(modules[name].register_forward_pre_hook(lambda _m, _inp, i=i: pre(i)))
            handles.append(modules[name].register_forward_hook(lambda _m, _inp, out, i=i: fn(i, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def pool(out: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: mean over all positions; a 2-D output is returned as is.

    Channels are dimension 1, as in every convolutional layer (and the gate points' convention).
    """
    if out.ndim < 2:
        raise ValueError(f"cannot pool a layer output of shape {tuple(out.shape)}: it needs (N, C, ...)")
    return out if out.ndim == 2 else out.flatten(2).mean(2)


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: each named module's pooled float output (:func:`pool`) goes into the yielded
    dict, keyed by name; the caller clears it between passes. A module that runs twice in one pass or
    returns something other than a tensor raises ``ValueError``. Hooks are always removed on exit."""
    layers = list(layers)
    store: dict[str, torch.Tensor] = {}

    def keep(i: int, output: Any) -> None:
        name = layers[i]
        if name in store:
            raise ValueError(f"module {name} runs more than once per forward pass; pick another layer")
        if not torch.is_tensor(output):
            raise ValueError(f"module {name} returns {type(output).__name__}, not a tensor")
        pooled = pool(output.float())
        store[name] = pooled.detach() if detach else pooled

    with hooked(model, layers, keep):
        yield store
