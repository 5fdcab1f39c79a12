"""The deep check: how stable is an input's path under small perturbations?

A clean input sits well inside its class; an adversarial one was pushed just across a boundary, and
small random changes of the image tend to move its path (and its prediction) much more. The deep check
runs the input ``k`` more times, each time under a small *probe* (a perturbation of the image), in the
same batched forward pass as the input itself (``(k + 1) * B`` rows), reads the same path at every gate
point, and returns what moves (:func:`probe_columns`). A deep guard adds these columns to its detector row.

Probes (:class:`ProbeSpec`): probe ``i`` applies the transform ``transforms[i % T]`` and then adds
Gaussian noise of standard deviation ``sigma`` (pixel units, images in ``[0, 1]``), clamped to ``[0, 1]``:

``noise``
    nothing besides the noise.
``bits``
    bit-depth reduction to ``bits`` bits per channel (Xu et al. 2018's squeezer). Rounding has no useful
    gradient: the differentiable version passes the gradient straight through (BPDA, Athalye et al. 2018).
``smooth``
    a 3x3 box filter (edges replicated); differentiable.
``shift``
    a translation by a seeded ``(dy, dx)`` in ``[-shift, shift]^2`` (not ``(0, 0)``), edges replicated;
    differentiable.

The noise pattern and the shift of probe ``i`` are drawn from a generator seeded with ``(seed, i)``:
every input gets the same probes, whatever its batch, and the first ``k'`` probes of a spec are the probes
of the same spec with ``k = k'``. An adaptive attacker who averages over the probes (EOT) draws them
afresh: ``dataclasses.replace(spec, seed=s)`` with random ``s``.

What moves (probe ``j`` against the original ``o``; ``a`` the absolute pooled activation of a gate
point, ``z`` its standardised path, ``s`` the class scores of :mod:`nad_guard.paths.features`; ``p`` the
softmax):

per gate point: ``dir`` ``1 - cos(a_j, a_o)``; ``strength`` ``|log ||a_j|| - log ||a_o|| |``;
``zdist`` ``sqrt(mean_c (z_j - z_o)^2)`` (standard deviations); ``nearest`` 1 when the nearest class
sub-architecture (``argmax_k s_k``) changes. Global: ``kl`` ``KL(p_o || p_j)``; ``l1`` ``sum |p_o - p_j|``;
``msp_drop`` ``p_o[y_o] - p_j[y_o]`` (``y_o`` the original prediction); ``pred`` 1 when the prediction
changes. Columns (:func:`probe_column_names`): the mean and the max over the probes of each continuous
quantity and the share of probes for each 0/1 one, over all probes and, with ``per_transform``, also over
each transform's probes; with ``per_layer=False`` the per-gate-point quantities are first averaged over the
gate points.

Differentiable counterpart for adaptive attacks: :func:`probe_columns_torch` (autograd through the
forward pass; the 0/1 changes carry the gradient of a smooth surrogate, straight-through). The numpy
:func:`probe_columns` is the same computation under ``torch.no_grad``, in batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nad_guard.hooks import device_of
from nad_guard.paths import PathFeatures, PathModel
from nad_guard.paths.features import LayerBasis, feature_basis, feature_matrix, path_features

TRANSFORMS = ("noise", "bits", "smooth", "shift")
LAYER_SHIFTS = ("dir", "strength", "zdist", "nearest")
GLOBAL_SHIFTS = ("kl", "l1", "msp_drop", "pred")
BINARY = ("nearest", "pred")  # 0/1 per probe: summarised by their share


@dataclass(frozen=True)
class ProbeSpec:
    """The deep check's probes (see the module docstring). ``k`` probes; ``transforms`` cycled over
    them; ``sigma`` the noise added to every probe; ``bits`` the depth of ``bits``; ``shift`` the
    largest translation of ``shift`` in pixels; ``seed`` fixes the noise patterns and shifts;
    ``per_transform``: also summarise each transform's probes on their own; ``per_layer=False``: the
    per-gate-point quantities averaged over gate points first (one column each, named ``layers``)."""

    k: int = 4
    transforms: tuple[str, ...] = ("noise", "bits", "smooth", "shift")
    sigma: float = 0.01
    bits: int = 5
    shift: int = 1
    seed: int = 0
    per_transform: bool = False
    per_layer: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad or not self.transforms:
            raise ValueError(f"transforms must be a non-empty list of {', '.join(TRANSFORMS)}; got {list(self.transforms)}")
        if self.sigma < 0 or not 1 <= self.bits <= 16 or self.shift < 1:
            raise ValueError(f"need sigma >= 0, 1 <= bits <= 16 and shift >= 1; got {self.sigma}, {self.bits}, "
                             f"{self.shift}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "transforms": list(self.transforms)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeSpec":
        return cls(**{**d, "transforms": tuple(d.get("transforms", cls.transforms))})

    def transform_of(self, i: int) -> str:
        """The transform of probe ``i``."""
        return self.transforms[i % len(self.transforms)]

    def groups(self) -> list[tuple[str, list[int]]]:
        """The probe groups summarised: ``("all", every probe)`` and, with ``per_transform`` (and more than
        one transform), each transform's probes."""
        out = [("all", list(range(self.k)))]
        if self.per_transform and len(self.transforms) > 1:
            out += [(t, [i for i in range(self.k) if self.transform_of(i) == t]) for t in self.transforms]
        return out


# ------------------------------------------------------------------ the perturbations


def _generator(spec: ProbeSpec, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(spec.seed) * 1_000_003 + i)


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` in ``[0, 1]`` rounded to ``bits`` bits; gradient passed straight through (BPDA)."""
    levels = 2 ** bits - 1
    return x + (torch.round(x * levels) / levels - x).detach()


def box_smooth(x: torch.Tensor) -> torch.Tensor:
    """3x3 box filter of ``(N, C, H, W)`` with edges replicated (differentiable)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by ``(dy, dx)`` pixels, edges replicated (differentiable)."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    return xp[..., p - dy:p - dy + h, p - dx:p - dx + w]


def probe_images(x: torch.Tensor, spec: ProbeSpec, i: int) -> torch.Tensor:
    """Probe ``i`` of ``x`` ``(B, C, H, W)`` in ``[0, 1]`` (same device and dtype; differentiable, with
    BPDA for the bit-depth rounding)."""
    g = _generator(spec, i)
    t = spec.transform_of(i)
    noise = torch.randn(tuple(x.shape[1:]), generator=g)
    if t == "bits":
        x = bit_depth(x, spec.bits)
    elif t == "smooth":
        x = box_smooth(x)
    elif t == "shift":
        moves = [(dy, dx) for dy in range(-spec.shift, spec.shift + 1) for dx in range(-spec.shift, spec.shift + 1)
                 if (dy, dx) != (0, 0)]
        dy, dx = moves[int(torch.randint(len(moves), (1,), generator=g))]
        x = translate(x, dy, dx)
    if spec.sigma > 0:
        x = x + spec.sigma * noise.to(device=x.device, dtype=x.dtype)
    return x.clamp(0, 1)


def probe_batch(x: torch.Tensor, spec: ProbeSpec) -> torch.Tensor:
    """``((k + 1) * B, C, H, W)``: ``x`` followed by its ``k`` probes (probe-major: rows
    ``(i + 1) * B ... (i + 2) * B`` are probe ``i``)."""
    return torch.cat([x] + [probe_images(x, spec, i) for i in range(spec.k)])


# ------------------------------------------------------------------ what moves


def probe_shifts_torch(pooled: Sequence[torch.Tensor], logits: torch.Tensor, basis: Sequence[LayerBasis], b: int,
                       k: int) -> dict[str, torch.Tensor]:
    """Per probe, what moved, from one pass over ``probe_batch`` rows (``pooled``: per gate point
    ``((k + 1) * b, C_l)``; ``logits`` ``((k + 1) * b, K)``): name -> ``(b, k)`` (global) or
    ``(b, k, L)`` (per gate point). The 0/1 quantities carry a smooth surrogate's gradient."""
    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:b], t[b:].reshape(k, b, *t.shape[1:]).transpose(0, 1)  # (b, ...), (b, k, ...)

    out: dict[str, list[torch.Tensor]] = {n: [] for n in LAYER_SHIFTS}
    for a, lb in zip(pooled, basis, strict=True):
        a = a.to(lb.mask_t.dtype)
        mag0, magj = split(a.abs())
        n0, nj = mag0.norm(dim=1).clamp_min(1e-12), magj.norm(dim=2).clamp_min(1e-12)
        out["dir"].append(1 - (magj * mag0[:, None]).sum(2) / (nj * n0[:, None]))
        out["strength"].append((torch.log(nj) - torch.log(n0)[:, None]).abs())
        z = (a - lb.mean) / lb.std
        z0, zj = split(z)
        out["zdist"].append((zj - z0[:, None]).pow(2).mean(2).clamp_min(1e-12).sqrt())
        s0, sj = split(z @ lb.score_t)
        near0 = s0.argmax(1)  # (b,)
        hard = (sj.argmax(2) != near0[:, None]).to(sj.dtype)
        soft = 1 - sj.softmax(2).gather(2, near0.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)
        out["nearest"].append(hard + (soft - soft.detach()))
    res = {n: torch.stack(v, 2) for n, v in out.items()}  # (b, k, L)
    l0, lj = split(logits)
    logp0, logpj = l0.log_softmax(1), lj.log_softmax(2)
    p0, pj = logp0.exp(), logpj.exp()
    y0 = l0.argmax(1)
    res["kl"] = (p0[:, None] * (logp0[:, None] - logpj)).sum(2)
    res["l1"] = (p0[:, None] - pj).abs().sum(2)
    at_y0 = pj.gather(2, y0.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)
    res["msp_drop"] = p0.gather(1, y0[:, None]) - at_y0
    hard = (lj.argmax(2) != y0[:, None]).to(lj.dtype)
    res["pred"] = hard + ((1 - at_y0) - (1 - at_y0).detach())
    return res


def shift_columns_torch(shifts: dict[str, torch.Tensor], spec: ProbeSpec) -> torch.Tensor:
    """``(B, F)`` columns (:func:`probe_column_names` order) from :func:`probe_shifts_torch`'s per-probe
    quantities; the first ``spec.k`` probes are used. Zeros when ``k = 0``."""
    b = next(iter(shifts.values())).shape[0]
    cols = []
    for _, idx in spec.groups():
        for name in LAYER_SHIFTS + GLOBAL_SHIFTS:
            t = shifts[name]
            if t.ndim == 2:
                t = t[..., None]
            elif not spec.per_layer:
                t = t.mean(2, keepdim=True)
            t = t[:, idx]  # (B, k_g, L or 1)
            if not idx:
                t = t.new_zeros(b, 1, t.shape[2])
            if name in BINARY:
                cols.append(t.mean(1))
            else:
                cols += [t.mean(1), t.amax(1)]
    return torch.cat(cols, 1)


def probe_column_names(layers: Sequence[str], spec: ProbeSpec) -> list[str]:
    """Names of :func:`probe_columns`' columns: ``probe[GROUP]:LAYER:QUANTITY_STAT`` and
    ``probe[GROUP]:QUANTITY_STAT`` (``STAT`` ``mean``, ``max`` or ``share``)."""
    names = []
    for g, _ in spec.groups():
        for name in LAYER_SHIFTS + GLOBAL_SHIFTS:
            stats = ("share",) if name in BINARY else ("mean", "max")
            for st in stats:
                if name in LAYER_SHIFTS:
                    names += [f"probe[{g}]:{layer}:{name}_{st}" for layer in (layers if spec.per_layer else ["layers"])]
                else:
                    names.append(f"probe[{g}]:{name}_{st}")
    return names


@dataclass
class ProbeResult:
    """One deep pass: the original inputs' :class:`PathFeatures` and pooled gate-point activations (as
    :func:`nad_guard.encoding.features_with_pooled` gives them), the probe ``columns`` ``(N, F)`` float64,
    and, with ``keep_shifts``, the per-probe quantities (name -> ``(N, k)`` or ``(N, k, L)``). Unpacks as
    ``(features, pooled, columns)``."""

    features: PathFeatures
    pooled: list[torch.Tensor]
    columns: np.ndarray
    shifts: dict[str, np.ndarray] = field(default_factory=dict)

    def __iter__(self):
        """``f, pooled, columns = probe_features(...)``."""
        return iter((self.features, self.pooled, self.columns))


def _basis(paths: PathModel, device: torch.device) -> list[LayerBasis]:
    names = paths.layer_names_
    return feature_basis([paths.masks_[n].to(device) for n in names], [paths.stats_[n].to(device) for n in names])


def probe_columns_torch(paths: PathModel, x: torch.Tensor, spec: ProbeSpec) -> torch.Tensor:
    """:func:`probe_columns` of ``x`` ``(B, C, H, W)`` (on the classifier's device) as a float32 tensor
    with autograd (one forward pass of ``(k + 1) * B`` rows), for adaptive attacks: EOT draws fresh
    probes with ``dataclasses.replace(spec, seed=s)``; bit-depth rounding is BPDA (straight-through)."""
    b = len(x)
    if spec.k == 0:
        return x.new_zeros(b, len(probe_column_names(paths.layer_names_, spec)))
    logits, pooled = paths.pooled_forward(probe_batch(x, spec))
    return shift_columns_torch(probe_shifts_torch(pooled, logits, _basis(paths, x.device), b, spec.k), spec)


@torch.no_grad()
def probe_features(paths: PathModel, x: torch.Tensor, spec: ProbeSpec, *, batch_size: int | None = None,
                   top_k: float = 0.25, keep_shifts: bool = False) -> ProbeResult:
    """The deep check of ``x`` float ``(N, C, H, W)`` in ``[0, 1]``: per batch of ``batch_size`` inputs,
    ONE forward pass of the inputs and their ``k`` probes (``(k + 1) * batch_size`` rows), from which come
    both the inputs' own path features (equal to :meth:`PathModel.features`') and the probe columns.

    ``batch_size=None``: :func:`rows_per_pass` (passes of at most 256 rows). Larger passes cost more per
    row on CPU (measured on the 2-core machine, ResNet-20, 64 inputs, k = 8: 11.2 plain forwards in one
    pass of 576 rows, 7.4 in passes of at most 256; k = 16: 33.9 against 14.5)."""
    paths.classifier.check_input(x)
    device = device_of(paths.classifier)
    names = paths.layer_names_
    basis = _basis(paths, device)
    batch_size = rows_per_pass(spec) if batch_size is None else batch_size
    masks = [paths.masks_[n].to(device) for n in names]
    stats = [paths.stats_[n].to(device) for n in names]
    parts_all, pooled_all, cols, shifts = [], [], [], []
    for xb in x.split(max(1, batch_size)):
        xb = xb.to(device)
        b = len(xb)
        logits, pooled = paths.pooled_forward(probe_batch(xb, spec))
        parts = path_features([a[:b] for a in pooled], logits[:b], masks, stats, top_k=top_k, basis=basis)
        parts["logits"] = logits[:b]
        parts_all.append({k: v.cpu() for k, v in parts.items()})
        pooled_all.append([a[:b].float().cpu() for a in pooled])
        if spec.k:
            sh = probe_shifts_torch(pooled, logits, basis, b, spec.k)
            cols.append(shift_columns_torch(sh, spec).double().cpu().numpy())
            if keep_shifts:
                shifts.append({k: v.float().cpu().numpy() for k, v in sh.items()})
        else:
            cols.append(np.zeros((b, len(probe_column_names(names, spec)))))
    parts = {k: torch.cat([p[k] for p in parts_all]) for k in parts_all[0]}
    X, feature_names = feature_matrix(parts, names)
    known = set(PathFeatures.__dataclass_fields__)
    f = PathFeatures(X=X.float(), names=feature_names, layers=names, **{k: v for k, v in parts.items() if k in known})
    pooled_cat = [torch.cat([p[i] for p in pooled_all]) for i in range(len(names))]
    kept = {k: np.concatenate([s[k] for s in shifts]) for k in shifts[0]} if shifts else {}
    return ProbeResult(f, pooled_cat, np.concatenate(cols), kept)


def probe_columns(paths: PathModel, x: torch.Tensor, spec: ProbeSpec, batch_size: int | None = None) -> np.ndarray:
    """``(N, F)`` float64 probe columns of ``x`` (names: :func:`probe_column_names`); one forward pass of
    ``(k + 1) * batch_size`` rows per batch of ``batch_size`` inputs (see :func:`probe_features`)."""
    return probe_features(paths, x, spec, batch_size=batch_size).columns


def rows_per_pass(spec: ProbeSpec, rows: int = 256) -> int:
    """How many inputs to put in one deep pass so that it holds about ``rows`` rows (at least 1)."""
    return max(1, math.floor(rows / (spec.k + 1)))
