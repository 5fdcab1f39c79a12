"""The fitted model of a classifier's class sub-architectures: :class:`PathModel`.

It holds the learned gates and masks and the channel statistics per gate point, reads an input's path
from the single forward pass that predicts, and turns it into the divergence features of
:mod:`nad_guard.paths.features`. Its artifacts are written and read by :mod:`nad_guard.paths.artifact`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError

from nad_guard.hooks import device_of, hooked, pool, torch_threads
from nad_guard.models import Classifier
from nad_guard.paths.artifact import ArtifactError, read_artifact, write_artifact
from nad_guard.paths.features import (ChannelStats, LayerBasis, PathFeatures, feature_basis, feature_matrix,
                                      mask_similarity, path_features, subnetwork_features)
from nad_guard.paths.gate_points import apply_gate, find_gate_points


class PathModel:
    """Per-class sub-architectures of a frozen classifier and the path-divergence features.

    Args:
        classifier: the frozen :class:`Classifier`; it is never modified.
        layers: gate point names in ``classifier.net`` (``None``: automatic, see :func:`find_gate_points`).

    Learned state (set by :meth:`set_gates`, which :func:`training.paths.fit_paths` and :meth:`load`
    call): ``gate_points_``, ``gates_`` and ``masks_`` (layer name -> ``(K, C_l)`` float in ``(0, 1)``
    / bool), ``class_names_``, ``training_`` (config) and ``metrics_``; and ``stats_`` (layer name ->
    :class:`ChannelStats`), set by :meth:`fit_stats` (or passed to :meth:`set_gates`). Features need both.
    """

    def __init__(self, classifier: Classifier, layers: Sequence[str] | None = None):
        self.classifier = classifier
        self.layers = layers

    def __repr__(self) -> str:
        state = f", {len(self.gate_points_)} gate points" if hasattr(self, "masks_") else ", not fitted"
        return f"PathModel({self.classifier.name!r}{state})"

    # ---- learned state
    def set_gates(self, gates: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None, *,
                  stats: Mapping[str, ChannelStats] | None = None, training: dict[str, Any] | None = None,
                  metrics: dict[str, Any] | None = None) -> "PathModel":
        """Install learned gates (layer name -> ``(K, C_l)`` in ``[0, 1]``); ``masks`` default to
        ``gates > 0.5``; ``stats`` (layer name -> :class:`ChannelStats`) are kept if given, else
        :meth:`fit_stats` must run before features are read. Raises ``ValueError`` if names or shapes do
        not fit the classifier."""
        points = find_gate_points(self.classifier, self.layers)
        names = [p.name for p in points]
        if set(gates) != set(names) or (masks is not None and set(masks) != set(names)):
            raise ValueError(f"gates are for layers {sorted(gates)}, the model's gate points are {names}")
        k = self.classifier.num_classes
        new_gates, new_masks = {}, {}
        for p in points:
            g = gates[p.name].detach().float().cpu()
            m = (g > 0.5) if masks is None else masks[p.name].detach().cpu().bool()
            for what, t in (("gates", g), ("masks", m)):
                if tuple(t.shape) != (k, p.channels):
                    raise ValueError(f"{what} for {p.name!r} have shape {tuple(t.shape)}, expected ({k}, {p.channels})")
            if not torch.isfinite(g).all() or g.min() < 0 or g.max() > 1:
                raise ValueError(f"gates for {p.name!r} must lie in [0, 1]")
            new_gates[p.name], new_masks[p.name] = g, m
        new_stats = None
        if stats is not None:
            if set(stats) != set(names):
                raise ValueError(f"statistics are for layers {sorted(stats)}, the model's gate points are {names}")
            new_stats = {}
            for p in points:
                st = stats[p.name]
                st = ChannelStats(*(t.detach().float().cpu() for t in (st.mean, st.std, st.centroids)))
                if (tuple(st.mean.shape), tuple(st.std.shape), tuple(st.centroids.shape)) != \
                        ((p.channels,), (p.channels,), (k, p.channels)):
                    raise ValueError(f"statistics for {p.name!r} have shapes {tuple(st.mean.shape)}, "
                                     f"{tuple(st.std.shape)}, {tuple(st.centroids.shape)}; expected ({p.channels},), "
                                     f"({p.channels},), ({k}, {p.channels})")
                if not all(torch.isfinite(t).all() for t in (st.mean, st.std, st.centroids)) or st.std.min() <= 0:
                    raise ValueError(f"statistics for {p.name!r} must be finite with positive std")
                new_stats[p.name] = st
        self.gate_points_, self.gates_, self.masks_ = points, new_gates, new_masks
        if new_stats is not None:
            self.stats_ = new_stats
        elif hasattr(self, "stats_"):
            del self.stats_
        self.class_names_ = list(self.classifier.class_names)
        self.training_, self.metrics_ = dict(training or {}), dict(metrics or {})
        return self

    def _check_fitted(self, stats: bool = False) -> None:
        if not hasattr(self, "masks_"):
            raise NotFittedError("this PathModel has no masks yet: fit it with training.paths.fit_paths "
                                 "or load a saved artifact with PathModel.load")
        if stats and not hasattr(self, "stats_"):
            raise NotFittedError("this PathModel has masks but no channel statistics: call "
                                 "fit_stats(training images) before reading features")

    @torch.no_grad()
    def fit_stats(self, images: Any, labels: torch.Tensor | None = None, *, batch_size: int = 256,
                  progress: bool = False) -> "PathModel":
        """Fit the channel statistics (see :mod:`nad_guard.paths.features`) from clean training images, streamed.

        ``images``: an :class:`~nad_guard.data.ImageSet`, or a float ``(N, C, H, W)`` tensor in ``[0, 1]``
        with ``labels`` ``(N,)``. Means, standard deviations and class centroids are taken over the
        images the classifier labels correctly (all images if it labels none correctly; a class without
        correctly labelled images gets the centroid of all its images). Memory does not grow with N.
        """
        from tqdm.auto import tqdm

        self._check_fitted()
        names, k = self.layer_names_, self.classifier.num_classes
        if labels is None:
            get = lambda s, e: images.float(s, e)  # noqa: E731
            labels = images.labels
        else:
            get = lambda s, e: images[s:e]  # noqa: E731
        n = len(labels)
        if n == 0:
            raise ValueError("fit_stats needs at least one image")
        device = device_of(self.classifier)
        # per layer: [sum, sumsq] over correct and over all rows; per-class sums and counts (correct, all)
        acc = {key: [None] * len(names) for key in ("s_ok", "q_ok", "s_all", "q_all", "c_ok", "c_all")}
        cnt_ok, cnt_all = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        for s in tqdm(range(0, n, batch_size), desc="channel stats", disable=not progress, leave=False):
            x, y = get(s, s + batch_size).to(device), labels[s:s + batch_size].to(device)
            logits, pooled = self.pooled_forward(x)
            ok = (logits.argmax(1) == y).double()
            onehot = F.one_hot(y, k).double()
            cnt_ok += (onehot * ok[:, None]).sum(0).cpu()
            cnt_all += onehot.sum(0).cpu()
            for i, a in enumerate(pooled):
                a = a.double()
                for key, val in (("s_ok", (a * ok[:, None]).sum(0)), ("q_ok", (a * a * ok[:, None]).sum(0)),
                                 ("s_all", a.sum(0)), ("q_all", (a * a).sum(0)),
                                 ("c_ok", (onehot * ok[:, None]).T @ a), ("c_all", onehot.T @ a)):
                    val = val.cpu()
                    acc[key][i] = val if acc[key][i] is None else acc[key][i] + val
        use_ok = cnt_ok.sum() > 0
        total = cnt_ok.sum() if use_ok else cnt_all.sum()
        stats = {}
        for i, name in enumerate(names):
            mean = (acc["s_ok"][i] if use_ok else acc["s_all"][i]) / total
            var = ((acc["q_ok"][i] if use_ok else acc["q_all"][i]) / total - mean ** 2).clamp_min(0)
            std = var.sqrt()
            std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
            class_mean = torch.where((cnt_ok > 0)[:, None], acc["c_ok"][i] / cnt_ok.clamp_min(1)[:, None],
                                     acc["c_all"][i] / cnt_all.clamp_min(1)[:, None])
            centroids = torch.where((cnt_all > 0)[:, None], (class_mean - mean) / std, torch.zeros_like(class_mean))
            stats[name] = ChannelStats(mean.float(), std.float(), centroids.float())
        self.stats_ = stats
        self.metrics_ = {**self.metrics_, "stats_images": int(total), "stats_from": "correct" if use_ok else "all",
                         "stats_classes_without_images": [self.class_names_[j] for j in range(k) if cnt_all[j] == 0]}
        return self

    @property
    def layer_names_(self) -> list[str]:
        self._check_fitted()
        return [p.name for p in self.gate_points_]

    def kept_fraction(self) -> torch.Tensor:
        """``(L, K)``: share of each layer's channels in each class's mask."""
        self._check_fitted()
        return torch.stack([self.masks_[n].float().mean(1) for n in self.layer_names_])

    def similarity(self) -> torch.Tensor:
        """``(K, K)`` class sub-architecture similarity, see :func:`mask_similarity`."""
        self._check_fitted()
        return mask_similarity([self.masks_[n] for n in self.layer_names_])

    def _feature_basis(self, device: torch.device, dtype: torch.dtype) -> list[LayerBasis]:
        """:func:`feature_basis` of the learned masks and statistics, kept until they are replaced
        (the cache holds the very tensors it was computed from and is checked against them)."""
        names = self.layer_names_
        source = [self.masks_[n] for n in names] + [t for n in names for t in
                                                     (self.stats_[n].mean, self.stats_[n].std, self.stats_[n].centroids)]
        key = (str(device), dtype)
        cached = getattr(self, "_basis_cache", None)
        if cached is not None and cached[0] == key and len(cached[1]) == len(source) and all(
                a is b for a, b in zip(cached[1], source)):
            return cached[2]
        basis = feature_basis([self.masks_[n].to(device) for n in names], [self.stats_[n].to(device) for n in names],
                              dtype)
        self._basis_cache = (key, source, basis)
        return basis

    # ---- forward passes
    def pooled_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass: logits ``(N, K)`` and pooled activations per gate point ``(N, C_l)``.

        ``x`` float ``(N, C, H, W)`` in ``[0, 1]`` on the classifier's device. Gradients flow when
        called outside ``torch.no_grad`` (e.g. for adaptive attacks).
        """
        names = self.layer_names_
        pooled: list[torch.Tensor | None] = [None] * len(names)

        def record(i: int, out: torch.Tensor) -> None:
            pooled[i] = pool(out)

        with hooked(self.classifier.net, names, record):
            logits = self.classifier(x)
        return logits, pooled  # type: ignore[return-value]

    def subnetwork_logits(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` with sample ``i``'s gate point outputs multiplied by the binary mask of
        class ``classes[i]`` (its class subnetwork)."""
        names = self.layer_names_
        masks = [self.masks_[n].to(x.device)[classes.to(x.device)] for n in names]
        with hooked(self.classifier.net, names, lambda i, out: apply_gate(out, masks[i])):
            return self.classifier(x)

    def features(self, x: torch.Tensor, *, top_k: float = 0.25, subnetwork: bool = False,
                 batch_size: int = 256) -> PathFeatures:
        """Path-divergence features of ``x`` float ``(N, C, H, W)`` in ``[0, 1]``.

        One forward pass per batch of ``batch_size`` under ``torch.no_grad`` (two with
        ``subnetwork=True``). Sample ``i``'s features do not depend on the rest of the batch. On CPU the
        feature arithmetic after each pass runs on one torch thread (:func:`torch_threads`).
        """
        self._check_fitted(stats=True)
        self.classifier.check_input(x)
        names = self.layer_names_
        device = device_of(self.classifier)
        masks = [self.masks_[n].to(device) for n in names]
        stats = [self.stats_[n].to(device) for n in names]
        chunks: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for xb in x.split(batch_size):
                xb = xb.to(device)
                logits, pooled = self.pooled_forward(xb)
                with torch_threads(1) if device.type == "cpu" else nullcontext():
                    parts = path_features(pooled, logits, masks, stats, top_k=top_k,
                                          basis=self._feature_basis(device, pooled[0].dtype))
                if subnetwork:
                    parts |= subnetwork_features(self.subnetwork_logits(xb, parts["pred"]), parts["pred"],
                                                 parts["msp"])
                parts["logits"] = logits
                chunks.append({k: v.cpu() for k, v in parts.items()})
        parts = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        X, feature_names = feature_matrix(parts, names)
        known = {f.name for f in fields(PathFeatures)}
        return PathFeatures(X=X.float(), names=feature_names, layers=names,
                            **{k: v for k, v in parts.items() if k in known})

    # ---- artifacts
    def save(self, path: str | Path) -> Path:
        """Write ``meta.json`` and ``paths.safetensors`` into directory ``path`` (created if needed).

        ``meta["detector"]`` is reset to ``None``: a detector trained on the old paths no longer fits.
        """
        self._check_fitted(stats=True)
        return write_artifact(path, self.classifier, self.gate_points_, self.gates_, self.masks_, self.stats_,
                              class_names=self.class_names_, training=self.training_, metrics=self.metrics_)

    @classmethod
    def load(cls, path: str | Path, classifier: Classifier, *, check_weights: bool = True) -> "PathModel":
        """Load an artifact written by :meth:`save` for ``classifier``.

        Raises :class:`ArtifactError` if files are missing or corrupt, the format version is unknown,
        or it does not fit ``classifier`` (input spec, classes, layer names, channel counts, and, with
        ``check_weights``, the weights fingerprint).
        """
        path = Path(path)
        meta, layers, gates, masks, stats = read_artifact(path, classifier, check_weights=check_weights)
        try:
            return cls(classifier, layers).set_gates(
                gates, masks, stats=stats, training=meta.get("training"), metrics=meta.get("metrics"))
        except ValueError as e:
            raise ArtifactError(f"artifact {path} does not fit the classifier: {e}") from e
