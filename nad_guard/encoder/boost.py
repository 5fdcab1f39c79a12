"""Per-input channel gates on a fine-tuned COPY of a CIFAR ResNet: feature boosting and suppression's
winner-take-all gates (FBS; Gao, Zhao, Dudziak, Mullins, Xu, ICLR 2019, arXiv:1810.05331), used for NND's
use 2 (acceleration) where gates on the frozen classifier missed the target (docs/encoder.md).

For every residual block a *saliency predictor* (one ``Linear(C_in, C_inner)``) reads the block's input,
global-average-pooled, and scores the block's inner channels (the first convolution's outputs, which only
the block's second convolution reads); the ``k = round(keep * C_inner)`` highest scores stay open, the rest
are closed for that input. The block's output channels, and so the residual stream, are never gated. The
FLOP budget is therefore exact and the same for every image: both convolutions of every block shrink to
``k / C_inner`` of their work.

Unlike FBS, an open channel is passed unscaled (gate value 1 in the forward pass); its gradient reaches the
predictor's score through ``exp(score - score.detach())`` (value 1, derivative 1): a straight-through
estimator for the kept channels. Closed channels get no gradient, as in FBS.

The network is **not** the guard's classifier: :class:`BoostedResNet` owns a copy of the classifier's
weights, fine-tuned with the predictors (``training/boost.py``: distillation from the frozen original plus
the label loss). The guard keeps watching the original. :func:`nad_guard.encoder.skip_forward_topk` runs it
with the closed channels skipped.

Files (``boosted.safetensors`` + ``boosted.json``, format ``nad-guard-boosted`` version
:data:`BOOSTED_VERSION`): the copy's weights and the predictors, ``keep``, the original's name and weights
fingerprint, training settings and metrics.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nad_guard.hooks import pool
from nad_guard.models import BasicBlock, Classifier, CifarResNet
from nad_guard.paths import ArtifactError, library_versions, weights_fingerprint

BOOSTED_FORMAT, BOOSTED_VERSION = "nad-guard-boosted", 1
BOOSTED_META, BOOSTED_TENSORS = "boosted.json", "boosted.safetensors"


def topk_gates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner-take-all gates ``(N, C)`` (1 on the ``k`` highest scores per row, 0 elsewhere; the kept ones
    carry the scores' gradient) and the kept indices ``(N, k)``."""
    idx = scores.topk(k, dim=1).indices
    mask = torch.zeros_like(scores).scatter_(1, idx, 1.0)
    return mask * torch.exp(scores - scores.detach()), idx


class BoostedResNet(nn.Module):
    """A copy of ``classifier``'s CIFAR ResNet with a saliency predictor per block (``keep``: the share of
    each block's inner channels open per input). ``forward`` takes the *normalised* image, like the network
    it copies; :meth:`as_classifier` wraps it for ``[0, 1]`` images. The masked forward multiplies closed
    channels by 0 (full FLOPs); :func:`nad_guard.encoder.skip_forward_topk` skips them."""

    def __init__(self, classifier: Classifier, keep: float = 0.65):
        super().__init__()
        if not isinstance(classifier.net, CifarResNet):
            raise ValueError(f"top-k channel gates are implemented for the CIFAR ResNets, not "
                             f"{type(classifier.net).__name__}")
        if not 0 < keep <= 1:
            raise ValueError(f"keep must lie in (0, 1], got {keep}")
        object.__setattr__(self, "original", classifier)  # held, not owned: not in state_dict
        self.net = copy.deepcopy(classifier.net).requires_grad_(True)
        self.keep = float(keep)
        self.block_names = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(len(getattr(self.net, f"layer{i}")))]
        self.predictors = nn.ModuleList(nn.Linear(b.conv1.in_channels, b.conv1.out_channels) for b in self.blocks)
        self.k = [max(1, round(keep * b.conv1.out_channels)) for b in self.blocks]

    @property
    def blocks(self) -> list[BasicBlock]:
        return [self.net.get_submodule(n) for n in self.block_names]

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s saliency scores ``(N, C_inner)`` from its input ``h`` (pooled)."""
        return self.predictors[i](pool(h))

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net.bn1(self.net.conv1(z)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.pool(h), 1))

    def forward(self, z: torch.Tensor, return_gates: bool = False):
        """Logits ``(N, K)`` of the gated network on the normalised image ``z`` (and, with ``return_gates``,
        each block's gates ``(N, C_inner)``)."""
        h, gates = self.stem(z), []
        for i, b in enumerate(self.blocks):
            g, _ = topk_gates(self.scores(i, h), self.k[i])
            gates.append(g)
            a = torch.relu(b.bn1(b.conv1(h)) * g[:, :, None, None])
            h = torch.relu(b.bn2(b.conv2(a)) + b.shortcut(h))
        logits = self.head(h)
        return (logits, gates) if return_gates else logits

    def as_classifier(self) -> Classifier:
        """This network as a :class:`~nad_guard.models.Classifier` on ``[0, 1]`` images (frozen, eval mode)."""
        return Classifier(self, self.original.spec, f"{self.original.name}-topk{self.keep:g}")

    @torch.no_grad()
    def fit_predictors(self, z: torch.Tensor, ridge: float = 1e-3) -> None:
        """Start each predictor at the least-squares fit (ridge ``ridge``) of the block's pooled positive inner
        activation ``pool(relu(bn1(conv1(h))))`` from its pooled input, on normalised images ``z`` run through
        the ungated network: at first the gates keep the channels predicted to be the most active."""
        h = self.stem(z)
        for i, b in enumerate(self.blocks):
            a = pool(torch.relu(b.bn1(b.conv1(h))))
            p = torch.cat([pool(h), torch.ones(len(h), 1, dtype=h.dtype)], 1)
            sol = torch.linalg.solve(p.T @ p + ridge * torch.eye(p.shape[1], dtype=h.dtype), p.T @ a)
            self.predictors[i].weight.copy_(sol[:-1].T)
            self.predictors[i].bias.copy_(sol[-1])
            h = b(h)

    @torch.no_grad()
    def selection_counts(self, z: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
        """How often each block's inner channels are open on normalised images ``z``: ``(C_inner,)`` per block."""
        counts = [torch.zeros(b.conv1.out_channels) for b in self.blocks]
        for zb in z.split(batch_size):
            for c, g in zip(counts, self(zb, return_gates=True)[1]):
                c += g.sum(0)
        return counts

    @torch.no_grad()
    def static_net(self, channels: list[torch.Tensor]) -> CifarResNet:
        """A dense copy of the network with every block's inner channels cut to ``channels[i]`` (indices) for
        every input: no predictors, pre-sliced weights (the first convolution's rows, the batch norm's entries,
        the second convolution's columns). ``channels`` of one image's gates reproduce that image's logits."""
        net = copy.deepcopy(self.net).eval().requires_grad_(False)
        for name, idx in zip(self.block_names, channels):
            b = net.get_submodule(name)
            c1, c2, bn = b.conv1, b.conv2, b.bn1
            b.conv1 = nn.Conv2d(c1.in_channels, len(idx), 3, c1.stride, 1, bias=False)
            b.conv1.weight.copy_(c1.weight[idx])
            b.bn1 = nn.BatchNorm2d(len(idx), eps=bn.eps).eval()
            for t in ("weight", "bias", "running_mean", "running_var"):
                getattr(b.bn1, t).copy_(getattr(bn, t)[idx])
            b.conv2 = nn.Conv2d(len(idx), c2.out_channels, 3, 1, 1, bias=False)
            b.conv2.weight.copy_(c2.weight[:, idx])
        return net.requires_grad_(False)

    # ---- files
    def save(self, path: str | Path, *, half: bool = True, training: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None) -> Path:
        """Write ``boosted.safetensors`` (float16 with ``half``: half the size) and ``boosted.json`` into
        directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if half else torch.float32
        save_file({k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items()}, str(path / BOOSTED_TENSORS))
        meta = {"format": BOOSTED_FORMAT, "version": BOOSTED_VERSION, "keep": self.keep, "k": self.k,
                "dtype": str(dtype).removeprefix("torch."),
                "original": {"name": self.original.name, "weights_sha256": weights_fingerprint(self.original)},
                "class_names": list(self.original.class_names), "training": training or {},
                "metrics": metrics or {}, "versions": library_versions()}
        (path / BOOSTED_META).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, classifier: Classifier) -> "BoostedResNet":
        """Read a network written by :meth:`save`, fine-tuned from ``classifier`` (checked by its weights
        fingerprint); :class:`~nad_guard.paths.ArtifactError` says what does not fit."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = Path(path) / BOOSTED_META
        try:
            meta = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"cannot read {f}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != BOOSTED_FORMAT or meta.get("version") != BOOSTED_VERSION:
            raise ArtifactError(f"{f} is not a {BOOSTED_FORMAT} file of version {BOOSTED_VERSION}")
        if meta.get("original", {}).get("weights_sha256") != weights_fingerprint(classifier):
            raise ArtifactError(f"{path} was fine-tuned from other classifier weights")
        net = cls(classifier, float(meta["keep"]))
        try:
            state = {k: v.float() if v.is_floating_point() else v
                     for k, v in load_file(str(Path(path) / BOOSTED_TENSORS)).items()}
            net.load_state_dict(state, strict=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ArtifactError(f"cannot read {Path(path) / BOOSTED_TENSORS}: {str(e)[:300]}") from e
        net.training_meta, net.metrics_meta = meta.get("training", {}), meta.get("metrics", {})
        return net.eval()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.9,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
