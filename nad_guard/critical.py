"""Per-input critical data routing paths (CDRP; Wang et al., CVPR 2018), batched, for offline audits.

Where a :class:`~nad_guard.paths.PathModel` reads an input's path from the one predicting pass, CDRP
*optimises* a path for every input: one gate per channel at every gate point (the same points as
:func:`nad_guard.paths.find_gate_points` chooses, or ``layers``), initialised to 1, multiplied into
the gate point's output, and trained to keep the original prediction with as few channels as possible.
For image ``i`` with original softmax ``p_i`` and gates ``z_i``, the loss is

    L_i(z_i) = - sum_k p_ik * log softmax(f(x_i; z_i))_k  +  sparsity * sum_l sum_c |z_ilc|

(soft cross-entropy between the gated and the original softmax plus an L1 penalty, ``sparsity`` 0.05
in the released code). Plain SGD with momentum (lr 0.1, momentum 0.9) for ``steps`` (30) steps, gates
clamped to ``[0, max_gate]`` (``[0, 5]``) after each step; of the iterates ``0..steps`` (iterate 0 is
the all-ones start, the original network) the one with the lowest loss whose gated top-1 equals the
original top-1 is returned, so a valid path always exists.

Cost: ``steps + 1`` gated forward passes and ``steps`` backward passes per input, plus one plain
forward: an offline tool (audits, building training sets), not a serving path. Batching: a batch of
``N`` images is optimised jointly, with per-sample gates ``(N, C_l)`` and the *sum* of the per-sample
losses, so with BatchNorm in eval mode (a frozen :class:`~nad_guard.models.Classifier`) each image's
gates get only their own gradient and the result does not depend on the batch (up to floating-point
summation order). The classifier is not modified; the hooks are removed afterwards, also on errors.

Differences from the released code, stated: gates sit at nad-guard's gate points (block outputs for
ResNets, activations after convolutions otherwise) rather than on every convolution's output; images
are batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nad_guard.models import Classifier
from nad_guard.hooks import device_of, hooked
from nad_guard.paths import apply_gate, find_gate_points


@dataclass
class CriticalPaths:
    """Per-input critical paths (CPU tensors).

    ``layers``: gate point names; ``gates``: layer -> ``(N, C_l)`` gates in ``[0, max_gate]`` of the
    best iterate; ``pred`` ``(N,)`` the original top-1 (also the gated top-1 at the returned gates);
    ``loss`` ``(N,)`` the loss at the returned gates; ``best_step`` ``(N,)`` which iterate was kept
    (0: the all-ones start, i.e. no sparser path kept the prediction).
    """

    layers: list[str]
    gates: dict[str, torch.Tensor]
    pred: torch.Tensor
    loss: torch.Tensor
    best_step: torch.Tensor

    def vector(self) -> torch.Tensor:
        """``(N, sum_l C_l)``: the gates of all layers concatenated (CDRP's detector input)."""
        return torch.cat([self.gates[n] for n in self.layers], 1)

    def kept_fraction(self, threshold: float = 0.5) -> torch.Tensor:
        """``(N,)``: share of all gates above ``threshold``."""
        return (self.vector() > threshold).float().mean(1)


def critical_paths(classifier: Classifier, x: torch.Tensor, *, layers: Sequence[str] | None = None,
                   steps: int = 30, sparsity: float = 0.05, lr: float = 0.1, momentum: float = 0.9,
                   max_gate: float = 5.0, batch_size: int = 64) -> CriticalPaths:
    """CDRP critical paths of ``x`` float ``(N, C, H, W)`` in ``[0, 1]`` (see the module docstring).

    Args:
        classifier: the frozen classifier (unchanged).
        x: the inputs; moved batch by batch to the classifier's device.
        layers: gate point names (``None``: :func:`~nad_guard.paths.find_gate_points`'s choice).
        steps: SGD steps per batch (``steps + 1`` iterates are scored).
        sparsity: the L1 coefficient (lambda).
        lr, momentum: SGD settings.
        max_gate: gates are clamped to ``[0, max_gate]``.
        batch_size: images optimised together.
    """
    if steps < 0 or sparsity < 0 or lr <= 0 or not 0 <= momentum < 1 or max_gate <= 0 or batch_size < 1:
        raise ValueError(f"invalid settings: steps={steps}, sparsity={sparsity}, lr={lr}, momentum={momentum}, "
                         f"max_gate={max_gate}, batch_size={batch_size}")
    classifier.check_input(x)
    points = find_gate_points(classifier, layers)
    names = [p.name for p in points]
    device = device_of(classifier)
    parts: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for xb in x.split(batch_size):
        parts.append(_one_batch(classifier, names, [p.channels for p in points], xb.to(device), steps=steps,
                                sparsity=sparsity, lr=lr, momentum=momentum, max_gate=max_gate))
    return CriticalPaths(
        layers=names,
        gates={n: torch.cat([p[0][j] for p in parts]) for j, n in enumerate(names)},
        pred=torch.cat([p[1] for p in parts]), loss=torch.cat([p[2] for p in parts]),
        best_step=torch.cat([p[3] for p in parts]))


def _one_batch(classifier: Classifier, names: list[str], channels: list[int], x: torch.Tensor, *, steps: int,
               sparsity: float, lr: float, momentum: float, max_gate: float
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(x)
    with torch.no_grad():
        target = classifier(x).softmax(1)
    pred = target.argmax(1)
    gates = [torch.ones(n, c, device=x.device, requires_grad=True) for c in channels]
    best = [g.detach().clone() for g in gates]
    best_loss = torch.full((n,), float("inf"), device=x.device)
    best_step = torch.zeros(n, dtype=torch.long, device=x.device)
    opt = torch.optim.SGD(gates, lr=lr, momentum=momentum)
    with torch.enable_grad(), hooked(classifier.net, names, lambda i, out: apply_gate(out, gates[i])):
        for step in range(steps + 1):
            logits = classifier(x)
            loss = -(target * F.log_softmax(logits, 1)).sum(1) + sparsity * sum(g.abs().sum(1) for g in gates)
            with torch.no_grad():
                better = (logits.argmax(1) == pred) & (loss < best_loss)
                best_loss = torch.where(better, loss, best_loss)
                best_step = torch.where(better, torch.full_like(best_step, step), best_step)
                for b, g in zip(best, gates):
                    b[better] = g[better]
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                for g in gates:
                    g.clamp_(0.0, max_gate)
    return [b.cpu() for b in best], pred.cpu(), best_loss.detach().cpu(), best_step.cpu()
