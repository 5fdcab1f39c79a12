"""Results of attack runs: :class:`AttackStats`, :class:`AttackResult` (with its cache entry,
safetensors + JSON) and :func:`stats_table`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from nad_guard.attacks.cache import CACHE_FORMAT
from nad_guard.attacks.suites import AttackSpec


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


def stats_table(results: Mapping[str, AttackResult]) -> str:
    """Markdown table of success rate, mean perturbation and time per attack."""
    from nad_guard.metrics import markdown_table

    rows = [{"attack": a, "attacked": r.stats.n_correct, "success rate": r.stats.success_rate,
             "kept": r.stats.n_kept, "mean L-inf": r.stats.mean_linf, "mean L2": r.stats.mean_l2,
             "seconds": r.stats.seconds} for a, r in results.items()]
    return markdown_table(rows)
