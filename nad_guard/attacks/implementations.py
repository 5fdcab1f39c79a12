"""The attack implementations: the attack classes written here (:class:`CWL2`, :class:`DeepFool`,
:class:`GaussianNoise`) and :func:`build_attack`, which turns an :class:`AttackSpec`'s ``kind`` into
a torchattacks object (torchattacks 3.5.1's own, or one of these)."""

from __future__ import annotations

import torch
import torchattacks
from torchattacks.attack import Attack
from torch import nn

from nad_guard.attacks.suites import AttackSpec


class CWL2(torchattacks.CW):
    """torchattacks' CW-L2 with the box reparameterisation kept finite.

    torchattacks starts from ``w = atanh(2x - 1)``, which is infinite for pixels at exactly 0 or 1
    (most of an MNIST image), so those pixels get zero gradient and can never change. Clamping to
    ``+-(1 - box_eps)`` moves the start by at most ``box_eps / 2`` and frees them.
    """

    def __init__(self, model: nn.Module, c: float = 1.0, kappa: float = 0.0, steps: int = 50,
                 lr: float = 0.01, box_eps: float = 1e-6):
        super().__init__(model, c=c, kappa=kappa, steps=steps, lr=lr)
        self.box_eps = box_eps

    def inverse_tanh_space(self, x: torch.Tensor) -> torch.Tensor:
        return self.atanh(torch.clamp(x * 2 - 1, min=-1 + self.box_eps, max=1 - self.box_eps))


class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016) as in the authors' code, batched.

    torchattacks 3.5.1's ``DeepFool`` applies the overshoot to each step and clips each step to
    ``[0, 1]``: the steps shrink geometrically, it approaches the boundary without crossing it and
    succeeds on about half of the reference MNIST CNN's images or fewer, looping per sample. Here
    the overshoot multiplies the accumulated perturbation (``x + (1 + overshoot) * r_total``,
    clipped), the candidate classes are the ``num_candidates`` highest-scoring clean classes, and
    each step takes one backward pass per candidate for the whole batch. Deterministic.

    ``step_size`` scales each linearised step (1: just to the linearised boundary, as the original).
    Lee et al.'s released code passes 0.18, but its gradients come from a mean-reduced NLL loss over
    the ``K`` class copies, which divides them by ``K``, and the step then works out to ``0.18 * K``
    (1.8 for CIFAR-10) times the linearised one: an overshoot, for at most 5 steps.
    """

    def __init__(self, model: nn.Module, steps: int = 50, overshoot: float = 0.02, num_candidates: int = 10,
                 step_size: float = 1.0):
        super().__init__("DeepFool", model)
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.steps, self.overshoot, self.num_candidates = steps, overshoot, num_candidates
        self.step_size = step_size
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x0 = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        with torch.no_grad():
            logits = self.get_logits(x0)
        n_cand = min(self.num_candidates, logits.shape[1])
        # candidates: the true label first, then the other highest-scoring classes
        others = logits.scatter(1, y[:, None], float("-inf")).topk(n_cand - 1, dim=1).indices
        cand = torch.cat([y[:, None], others], dim=1)
        r_total = torch.zeros_like(x0)
        adv = x0.clone()
        active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        shape = (-1, *[1] * (x0.ndim - 1))
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break
            xa = adv[idx].clone().requires_grad_(True)
            out = self.get_logits(xa)
            still = out.argmax(1) == y[idx]
            active[idx[~still]] = False
            if not still.any():
                break
            f = out.gather(1, cand[idx])  # (b, n_cand), column 0 = true label
            grads = torch.stack([torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < n_cand - 1)[0]
                                 for j in range(n_cand)], dim=1)
            f = f.detach()
            f_diff = (f[:, 1:] - f[:, :1]).abs()
            w_diff = grads[:, 1:] - grads[:, :1]
            w_norm = w_diff.flatten(2).norm(dim=2).clamp_min(1e-8)
            best = (f_diff / w_norm).argmin(1)
            ar = torch.arange(len(idx), device=x0.device)
            step = ((f_diff[ar, best] + 1e-4) / w_norm[ar, best] ** 2).view(shape) * w_diff[ar, best]
            step = step * self.step_size
            sel = idx[still]
            r_total[sel] += step[still]
            adv[sel] = torch.clamp(x0[sel] + (1 + self.overshoot) * r_total[sel], 0, 1)
        return adv.detach()


class GaussianNoise(Attack):
    """Negative control: Gaussian noise rescaled per image to L-inf (or L2) size ``eps``, then
    clipped to ``[0, 1]`` (clipping can only shrink it). Uses the global torch RNG, which
    :func:`generate` seeds per batch."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: str = "Linf"):
        super().__init__("GaussianNoise", model)
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        self.eps, self.norm = eps, norm
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        noise = torch.randn_like(images)
        flat = noise.flatten(1)
        size = flat.abs().amax(1) if self.norm == "Linf" else flat.norm(dim=1)
        noise = noise * (self.eps / size.clamp_min(1e-12)).view(-1, *[1] * (images.ndim - 1))
        return torch.clamp(images + noise, 0, 1).detach()


KINDS = ("fgsm", "bim", "pgd", "pgdl2", "cw", "deepfool", "apgd", "square", "noise")


def build_attack(model: nn.Module, spec: AttackSpec) -> Attack:
    """The torchattacks object for ``spec`` on ``model`` (which must already be on its device)."""
    p = dict(spec.params)
    k = spec.kind
    if k == "fgsm":
        return torchattacks.FGSM(model, eps=spec.eps, **p)
    if k == "bim":
        return torchattacks.BIM(model, eps=spec.eps, **p)
    if k == "pgd":
        return torchattacks.PGD(model, eps=spec.eps, **p)
    if k == "pgdl2":
        return torchattacks.PGDL2(model, eps=spec.eps, **p)
    if k == "cw":
        return CWL2(model, **p)
    if k == "deepfool":
        return DeepFool(model, **p)
    if k == "apgd":
        return torchattacks.APGD(model, norm=spec.norm, eps=spec.eps, seed=spec.seed, **p)
    if k == "square":
        return torchattacks.Square(model, norm=spec.norm, eps=spec.eps, seed=spec.seed, **p)
    if k == "noise":
        return GaussianNoise(model, eps=spec.eps, norm=spec.norm, **p)
    raise ValueError(f"unknown attack kind {k!r}; choose one of {', '.join(KINDS)}")
