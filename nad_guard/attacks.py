"""Adversarial examples for evaluating detectors, generated honestly and cached.

Named *suites* hold dataset-appropriate settings for a fixed set of attacks (torchattacks 3.5.1):

==============  ======  =====================================================================
name            norm    what
==============  ======  =====================================================================
``fgsm``        L-inf   one signed-gradient step of size ``eps``
``bim``         L-inf   iterative FGSM, no random start (Kurakin et al.)
``pgd``         L-inf   projected gradient descent with a random start (Madry et al.)
``pgd-l2``      L2      PGD in an L2 ball
``cw-l2``       L2      Carlini-Wagner L2 (unbounded: minimal perturbation that succeeds)
``deepfool``    L2      DeepFool (unbounded; the authors' algorithm, batched: :class:`DeepFool`)
``apgd-ce``     L-inf   Auto-PGD, cross-entropy loss (seeded)
``apgd-dlr``    L-inf   Auto-PGD, difference-of-logits-ratio loss (seeded)
``square``      L-inf   Square attack, score-based black box, bounded queries (seeded)
``noise-linf``  L-inf   negative control: Gaussian noise rescaled to L-inf size ``eps``
``noise-l2``    L2      negative control: Gaussian noise rescaled to L2 size ``eps_l2``
==============  ======  =====================================================================

Suites: ``mnist`` (``eps`` 0.3, ``eps_l2`` 2.0), ``cifar10`` (``eps`` 8/255, ``eps_l2`` 0.5) and
``fast`` (few steps, for tests). :func:`get_suite` takes other ``eps`` / ``eps_l2`` values and
per-attack ``overrides``; step sizes scale with ``eps``.

:func:`generate` follows the usual evaluation rules: only images the classifier gets right are
attacked (that is the clean set), only successful adversarial examples are kept (prediction
changed; the noise controls keep every sample and report their "success" rate as it is), bounded
attacks are projected to their ball and to ``[0, 1]`` and checked. Images are float32 in
``[0, 1]`` throughout: quantising to ``uint8`` or storing float16 would change the attack.
Results are cached on disk as safetensors + JSON (no pickle), keyed by the model's weights and
name, the attack settings, the batch size and the data (a hash of the images and labels), so a
rerun loads instead of regenerating. Stochastic attacks are seeded per batch
(``seed + batch index``) inside a forked RNG, so results are reproducible and the caller's RNG
state is untouched. Results depend on ``batch_size`` (random draws, CW's early stop), which is
therefore part of the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torchattacks
from torchattacks.attack import Attack
from torch import nn

from nad_guard.data import ImageSet

CACHE_FORMAT = 1  # part of every cache key: bump it when an attack implementation here changes
PROJECTION_TOL = 1e-6
NOISE_ATTACKS = ("noise-linf", "noise-l2")


# --------------------------------------------------------------------------- attack classes

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
    """

    def __init__(self, model: nn.Module, steps: int = 50, overshoot: float = 0.02, num_candidates: int = 10):
        super().__init__("DeepFool", model)
        self.steps, self.overshoot, self.num_candidates = steps, overshoot, num_candidates
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


# --------------------------------------------------------------------------- suites

@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings.

    ``kind`` picks the implementation; ``norm`` and ``eps`` give the threat model (``eps=None``:
    unbounded, e.g. CW and DeepFool); ``params`` are the remaining constructor keywords; ``seed``
    seeds each batch (``seed + batch index``).
    """

    kind: str
    norm: str
    eps: float | None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(sorted(self.params.items()))
        return d


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


@dataclass(frozen=True)
class AttackSuite:
    """A named set of attacks with their settings."""

    name: str
    attacks: Mapping[str, AttackSpec]

    @property
    def names(self) -> list[str]:
        return list(self.attacks)

    def __getitem__(self, attack: str) -> AttackSpec:
        if attack not in self.attacks:
            raise ValueError(f"suite {self.name!r} has no attack {attack!r}; it has {', '.join(self.attacks)}")
        return self.attacks[attack]


def _standard(eps: float, eps_l2: float, *, bim: tuple[float, int], pgd: tuple[float, int],
              pgd_l2: tuple[float, int], cw: dict[str, Any], deepfool: dict[str, Any], apgd_steps: int,
              square_queries: int) -> dict[str, AttackSpec]:
    """All attacks; step sizes are given as fractions of ``eps``."""
    return {
        "fgsm": AttackSpec("fgsm", "Linf", eps),
        "bim": AttackSpec("bim", "Linf", eps, {"alpha": eps * bim[0], "steps": bim[1]}),
        "pgd": AttackSpec("pgd", "Linf", eps, {"alpha": eps * pgd[0], "steps": pgd[1], "random_start": True}),
        "pgd-l2": AttackSpec("pgdl2", "L2", eps_l2, {"alpha": eps_l2 * pgd_l2[0], "steps": pgd_l2[1],
                                                     "random_start": True}),
        "cw-l2": AttackSpec("cw", "L2", None, cw),
        "deepfool": AttackSpec("deepfool", "L2", None, deepfool),
        "apgd-ce": AttackSpec("apgd", "Linf", eps, {"steps": apgd_steps, "loss": "ce", "n_restarts": 1}),
        "apgd-dlr": AttackSpec("apgd", "Linf", eps, {"steps": apgd_steps, "loss": "dlr", "n_restarts": 1}),
        "square": AttackSpec("square", "Linf", eps, {"n_queries": square_queries, "p_init": 0.8, "n_restarts": 1,
                                                     "loss": "margin"}),
        "noise-linf": AttackSpec("noise", "Linf", eps),
        "noise-l2": AttackSpec("noise", "L2", eps_l2),
    }


def _mnist(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    # PGD as Madry et al. on MNIST (0.01 steps for eps 0.3, 40 steps). Measured on 200 mnist5k test
    # images with the reference CNN: CW c=10, Adam lr 0.1, 100 steps succeeds on all of them
    # (c=1, lr 0.01: ~12%); DeepFool needs ~100 steps on MNIST (50: ~80%).
    return _standard(eps, eps_l2, bim=(1 / 20, 30), pgd=(1 / 30, 40), pgd_l2=(1 / 20, 40),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 100, "lr": 0.1},
                     deepfool={"steps": 100, "overshoot": 0.02}, apgd_steps=50, square_queries=1000)


def _cifar10(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    # BIM: Kurakin's rule for 8/255 (alpha 1/255, 10 steps); PGD-20 with alpha 2/255.
    return _standard(eps, eps_l2, bim=(1 / 8, 10), pgd=(1 / 4, 20), pgd_l2=(1 / 5, 20),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 100, "lr": 0.01},
                     deepfool={"steps": 50, "overshoot": 0.02}, apgd_steps=50, square_queries=1000)


def _fast(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    """Every attack with a handful of steps: for tests, not for numbers."""
    return _standard(eps, eps_l2, bim=(1 / 3, 3), pgd=(1 / 3, 3), pgd_l2=(1 / 3, 3),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 10, "lr": 0.1},
                     deepfool={"steps": 10, "overshoot": 0.02}, apgd_steps=3, square_queries=20)


SUITES: dict[str, tuple[Any, float, float]] = {
    "mnist": (_mnist, 0.3, 2.0),
    "cifar10": (_cifar10, 8 / 255, 0.5),
    "fast": (_fast, 0.3, 2.0),
}


def get_suite(name: str, *, eps: float | None = None, eps_l2: float | None = None,
              overrides: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0) -> AttackSuite:
    """A named suite, optionally with another L-inf ``eps`` / L2 ``eps_l2`` (step sizes scale with
    them) and per-attack ``overrides``: ``{"cw-l2": {"c": 20}, "pgd": {"eps": 0.2, "steps": 100}}``
    (``eps``, ``norm`` and ``seed`` set the spec's fields, anything else a constructor keyword)."""
    if name not in SUITES:
        raise ValueError(f"unknown attack suite {name!r}; choose one of {', '.join(SUITES)}")
    build, default_eps, default_l2 = SUITES[name]
    eps = default_eps if eps is None else float(eps)
    eps_l2 = default_l2 if eps_l2 is None else float(eps_l2)
    if not (0 < eps <= 1) or eps_l2 <= 0:
        raise ValueError(f"eps must be in (0, 1] and eps_l2 positive, got {eps}, {eps_l2}")
    attacks = build(eps, eps_l2)
    attacks = {k: replace(v, seed=seed) for k, v in attacks.items()}
    for attack, changes in (overrides or {}).items():
        if attack not in attacks:
            raise ValueError(f"override for unknown attack {attack!r}; suite {name!r} has {', '.join(attacks)}")
        spec = attacks[attack]
        fields = {k: changes[k] for k in ("eps", "norm", "seed") if k in changes}
        params = {**spec.params, **{k: v for k, v in changes.items() if k not in fields}}
        attacks[attack] = replace(spec, params=params, **fields)
    suffix = "" if (eps, eps_l2) == (default_eps, default_l2) else f"(eps={eps:g},eps_l2={eps_l2:g})"
    return AttackSuite(name + suffix + ("+overrides" if overrides else ""), attacks)


# --------------------------------------------------------------------------- results

@dataclass
class AttackStats:
    """Summary of one attack run.

    ``success_rate`` = successful / attacked (attacked = clean images classified correctly); mean
    sizes are over the kept samples (successful ones; every sample for the noise controls).
    ``seconds`` is the original generation time, also when the result came from the cache.
    """

    attack: str
    n_images: int
    n_correct: int
    n_kept: int
    n_success: int
    success_rate: float
    mean_linf: float
    mean_l2: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """Adversarial examples of one attack on one model and data split.

    Attributes:
        attack, suite: the attack's name and the suite it came from.
        spec: its settings.
        key: the cache key (hex).
        adv_images: ``(M, C, H, W)`` float32 in ``[0, 1]``.
        indices: ``(M,)`` int64 positions in the input set of the attacked clean images.
        labels: ``(M,)`` int64 true labels (= the model's clean predictions).
        adv_preds: ``(M,)`` int64 predictions on ``adv_images``.
        success: ``(M,)`` bool, prediction changed; all true except for the noise controls.
        linf, l2: ``(M,)`` float32 perturbation sizes.
        clean_indices: int64 positions of every correctly classified input: the clean set.
        stats: :class:`AttackStats`.
        from_cache: whether this was loaded rather than generated.
    """

    attack: str
    suite: str
    spec: AttackSpec
    key: str
    adv_images: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor
    adv_preds: torch.Tensor
    success: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    clean_indices: torch.Tensor
    stats: AttackStats
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    _TENSORS = ("adv_images", "indices", "labels", "adv_preds", "success", "linf", "l2", "clean_indices")

    def save(self, stem: str | Path, meta: Mapping[str, Any] | None = None) -> None:
        """Write ``stem.safetensors`` then ``stem.json`` (the JSON's presence marks a complete entry)."""
        from safetensors.torch import save_file

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in self._TENSORS}
        tensors["success"] = tensors["success"].to(torch.uint8)
        tmp = stem.with_name(stem.name + f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
        record = {"format": CACHE_FORMAT, "key": self.key, "attack": self.attack, "suite": self.suite,
                  "spec": self.spec.to_dict(), "stats": self.stats.to_dict(), **(meta or {})}
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, stem.with_suffix(".json"))

    @classmethod
    def load(cls, stem: str | Path) -> "AttackResult":
        from safetensors.torch import load_file

        stem = Path(stem)
        record = json.loads(stem.with_suffix(".json").read_text())
        if record.get("format") != CACHE_FORMAT:
            raise ValueError(f"{stem}.json has cache format {record.get('format')}, expected {CACHE_FORMAT}")
        t = load_file(str(stem.with_suffix(".safetensors")))
        t["success"] = t["success"].bool()
        spec = AttackSpec(**record["spec"])
        return cls(record["attack"], record["suite"], spec, record["key"], **{k: t[k] for k in cls._TENSORS},
                   stats=AttackStats(**record["stats"]), from_cache=True)


# --------------------------------------------------------------------------- identity and cache keys

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


# --------------------------------------------------------------------------- generation

def _as_inputs(images: ImageSet | torch.Tensor, labels: torch.Tensor | None
               ) -> tuple[Any, torch.Tensor]:
    """Returns (a function index -> float batch, labels)."""
    if isinstance(images, ImageSet):
        if labels is not None:
            raise ValueError("labels come from the ImageSet; pass labels=None")
        return (lambda idx: images.images[idx].float().div_(255.0)), images.labels
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be an ImageSet or a float (N, C, H, W) tensor in [0, 1]")
    if labels is None:
        raise ValueError("labels are required when images is a tensor")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must lie in [0, 1]")
    return (lambda idx: images[idx].float()), labels


def _project(x: torch.Tensor, adv: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Project ``adv`` to ``spec``'s ball around ``x`` (if bounded) and to ``[0, 1]``, and check."""
    delta = adv - x
    if spec.eps is not None and spec.norm == "Linf":
        delta = delta.clamp(-spec.eps, spec.eps)
    elif spec.eps is not None and spec.norm == "L2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * torch.clamp(spec.eps / n, max=1.0).view(-1, *[1] * (x.ndim - 1))
    adv = (x + delta).clamp(0, 1)
    d = (adv - x).flatten(1)
    if spec.eps is not None:
        size = d.abs().amax(1) if spec.norm == "Linf" else d.norm(dim=1)
        if size.numel() and size.max().item() > spec.eps + PROJECTION_TOL:
            raise RuntimeError(f"projection failed: {spec.norm} size {size.max().item()} > eps {spec.eps}")
    if adv.numel() and (adv.min() < 0 or adv.max() > 1):
        raise RuntimeError("projection failed: images outside [0, 1]")
    return adv


@torch.no_grad()
def _predict(model: nn.Module, get, n: int, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        out.append(model(get(idx).to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def default_cache_dir() -> Path:
    """``$NAD_GUARD_CACHE/attacks`` (default ``~/.cache/nad-guard/attacks``)."""
    from nad_guard.data import cache_dir

    return cache_dir() / "attacks"


def generate(model: nn.Module, images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None,
             attack: str = "pgd", suite: str | AttackSuite = "mnist", batch_size: int = 128,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
             progress: bool = True) -> AttackResult:
    """Attack the correctly classified images of ``images`` with ``suite[attack]``.

    Args:
        model: a classifier on ``[0, 1]`` inputs returning logits (a :class:`~nad_guard.models.Classifier`);
            it is moved to ``device``.
        images: an :class:`ImageSet`, or a float ``(N, C, H, W)`` tensor in ``[0, 1]`` with ``labels``.
        attack: a name in the suite (see the module docstring).
        suite: a suite name for :func:`get_suite` or an :class:`AttackSuite`.
        batch_size: images per attack call; bounds memory. Part of the cache key.
        cache_dir: where results are cached; ``None`` disables caching.
        progress: show a tqdm bar over batches.

    Returns:
        :class:`AttackResult` with the successful adversarial examples (every sample for the noise
        controls) and their stats.
    """
    from tqdm.auto import tqdm

    suite = get_suite(suite) if isinstance(suite, str) else suite
    spec = suite[attack]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    get, labels = _as_inputs(images, labels)
    model = model.to(device)
    model.eval()

    stem = key = None
    if cache_dir is not None:
        key = cache_key(model_hash(model), data_hash(images, labels), attack, spec, batch_size)
        name = getattr(model, "name", type(model).__name__)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}__{attack}")  # no dots: suffixes
        stem = Path(cache_dir) / f"{safe}__{key[:24]}"
        if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
            try:
                result = AttackResult.load(stem)
                if result.key == key:
                    return result
                warnings.warn(f"cache entry {stem} has another key; regenerating")
            except Exception as e:  # a damaged entry is regenerated, not trusted
                warnings.warn(f"cannot read cache entry {stem} ({e}); regenerating")

    t0 = time.perf_counter()
    n = int(labels.shape[0])
    clean_pred = _predict(model, get, n, batch_size, device)
    clean_idx = torch.nonzero(clean_pred == labels).flatten()
    keep_all = spec.kind == "noise"
    atk = build_attack(model, spec)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("adv", "idx", "pred", "succ", "linf", "l2")}
    n_success = 0
    n_batches = math.ceil(len(clean_idx) / batch_size)
    for b in tqdm(range(n_batches), desc=attack, disable=not progress, leave=False):
        idx = clean_idx[b * batch_size:(b + 1) * batch_size]
        # contiguous: torchattacks' PGD-L2 and others call .view() on tensors shaped like x
        x, y = get(idx).to(device).contiguous(), labels[idx].to(device)
        seed = spec.seed + b
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seed)
            if hasattr(atk, "seed"):
                atk.seed = seed  # APGD and Square reseed the global RNG themselves
            adv = atk(x, y)
        adv = _project(x, adv.detach().float(), spec)
        with torch.no_grad():
            pred = model(adv).argmax(1)
        succ = pred != y
        n_success += int(succ.sum())
        keep = torch.ones_like(succ) if keep_all else succ
        delta = (adv[keep] - x[keep]).flatten(1)
        out["adv"].append(adv[keep].cpu())
        out["idx"].append(idx[keep.cpu()])
        out["pred"].append(pred[keep].cpu())
        out["succ"].append(succ[keep].cpu())
        out["linf"].append(delta.abs().amax(1).cpu())
        out["l2"].append(delta.norm(dim=1).cpu())
    seconds = time.perf_counter() - t0

    def cat(k: str, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(out[k]) if out[k] else empty

    image_shape = tuple(get(torch.arange(1)).shape[1:]) if n else (0, 0, 0)
    adv_images = cat("adv", torch.zeros((0, *image_shape)))
    indices = cat("idx", torch.zeros(0, dtype=torch.long))
    linf, l2 = cat("linf", torch.zeros(0)), cat("l2", torch.zeros(0))
    stats = AttackStats(
        attack=attack, n_images=n, n_correct=len(clean_idx), n_kept=len(indices), n_success=n_success,
        success_rate=n_success / max(len(clean_idx), 1),
        mean_linf=float(linf.mean()) if len(linf) else float("nan"),
        mean_l2=float(l2.mean()) if len(l2) else float("nan"), seconds=seconds)
    result = AttackResult(
        attack=attack, suite=suite.name, spec=spec, key=key or "", adv_images=adv_images.float().contiguous(),
        indices=indices.long(), labels=labels[indices].long(),
        adv_preds=cat("pred", torch.zeros(0, dtype=torch.long)).long(),
        success=cat("succ", torch.zeros(0, dtype=torch.bool)).bool(),
        linf=linf.float(), l2=l2.float(), clean_indices=clean_idx.long(), stats=stats)
    if stem is not None:
        result.save(stem, meta={
            "model": getattr(model, "name", type(model).__name__), "batch_size": batch_size,
            "data": getattr(images, "name", "tensor"), "device": str(device), "torch": torch.__version__,
            "torchattacks": torchattacks.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return result


def generate_suite(model: nn.Module, images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None,
                   suite: str | AttackSuite = "mnist", attacks: list[str] | None = None,
                   batch_size: int = 128, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, AttackResult]:
    """:func:`generate` for each attack of ``suite`` (or the given subset), in order."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    return {a: generate(model, images, labels, a, suite, batch_size, device, cache_dir, progress)
            for a in (attacks or suite.names)}


def stats_table(results: Mapping[str, AttackResult]) -> str:
    """Markdown table of success rate, mean perturbation and time per attack."""
    from nad_guard.metrics import markdown_table

    rows = [{"attack": a, "attacked": r.stats.n_correct, "success rate": r.stats.success_rate,
             "kept": r.stats.n_kept, "mean L-inf": r.stats.mean_linf, "mean L2": r.stats.mean_l2,
             "seconds": r.stats.seconds} for a, r in results.items()]
    return markdown_table(rows)
