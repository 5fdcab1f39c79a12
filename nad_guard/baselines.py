"""Established detectors to compare nad-guard against, as scikit-learn-style estimators.

Scores follow the project convention (see :mod:`nad_guard.metrics`): **higher = more suspicious**.

========================  =================================================================
:class:`MSP`              1 - max softmax probability (Hendrycks & Gimpel 2017)
:class:`Energy`           energy ``-T logsumexp(logits / T)`` (Liu et al. 2020)
:class:`Mahalanobis`      min class-conditional Mahalanobis distance per layer, shared
                          covariance (Lee et al. 2018); logistic regression across layers
                          or, unsupervised, the last layer's distance
:class:`LID`              local intrinsic dimensionality per layer w.r.t. a fixed clean
                          reference set (Ma et al. 2018); logistic regression across layers
                          or the last layer's LID
:class:`DeepKNN`          deep k-nearest neighbours with conformal p-values (Papernot &
                          McDaniel 2018): 1 - p-value of the predicted label, or
                          1 - credibility
========================  =================================================================

Every detector has two paths, as in pytorch-ood: the raw-input path ``fit(model, images, ...)`` /
``score(model, images)`` runs the model (one forward pass with hooks, streamed in batches) and
hands :class:`Features` to the feature path ``fit_features(features, ...)`` /
``score_features(features)``, which is cheap, so features can be extracted once, saved
(:meth:`Features.save`) and reused. ``__init__`` only stores parameters, learned state ends in
``_``, and using a detector before ``fit`` raises :class:`sklearn.exceptions.NotFittedError`.

Features are global-average-pooled activations ``(N, C)`` of named modules (see
:func:`default_layers`), plus the logits.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from nad_guard.calibration import p_values
from nad_guard.data import ImageSet
from nad_guard.hooks import capture

ImagesLike = ImageSet | torch.Tensor


# --------------------------------------------------------------------------- features

@dataclass
class Features:
    """Pooled activations and logits of ``N`` images.

    Attributes:
        layers: module name -> ``(N, C)`` float32 array (global-average-pooled for 4-D outputs,
            token-averaged for 3-D, as is for 2-D), in extraction order.
        logits: ``(N, K)`` float32 array, or ``None``.
    """

    layers: dict[str, np.ndarray]
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.layers = {k: np.asarray(v, dtype=np.float32) for k, v in self.layers.items()}
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float32)
        sizes = {len(v) for v in self.layers.values()} | ({len(self.logits)} if self.logits is not None else set())
        if len(sizes) > 1:
            raise ValueError(f"features disagree on the number of samples: {sorted(sizes)}")
        if any(v.ndim != 2 for v in self.layers.values()):
            raise ValueError("each layer's features must be (N, C)")

    def __len__(self) -> int:
        for v in self.layers.values():
            return len(v)
        return 0 if self.logits is None else len(self.logits)

    def subset(self, index: Any) -> "Features":
        idx = np.asarray(index)
        return Features({k: v[idx] for k, v in self.layers.items()},
                        None if self.logits is None else self.logits[idx])

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        """Stack features of the same layers along samples."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = list(parts[0].layers)
        if any(list(p.layers) != names for p in parts):
            raise ValueError("features to concatenate must have the same layers")
        logits = None if any(p.logits is None for p in parts) else np.concatenate([p.logits for p in parts])
        return Features({k: np.concatenate([p.layers[k] for p in parts]) for k in names}, logits)

    def predictions(self) -> np.ndarray:
        """The classifier's predicted labels (argmax of the logits)."""
        if self.logits is None:
            raise ValueError("these features carry no logits, so no predictions")
        return self.logits.argmax(1)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (layer order kept in its metadata)."""
        import json

        from safetensors.numpy import save_file

        arrays = {f"layer/{k}": np.ascontiguousarray(v) for k, v in self.layers.items()}
        if self.logits is not None:
            arrays["logits"] = np.ascontiguousarray(self.logits)
        save_file(arrays, str(path), metadata={"layers": json.dumps(list(self.layers))})

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            names = json.loads(f.metadata()["layers"])
            layers = {k: f.get_tensor(f"layer/{k}") for k in names}
            logits = f.get_tensor("logits") if "logits" in f.keys() else None
        return cls(layers, logits)


def default_layers(model: nn.Module) -> list[str]:
    """Module names (relative to ``model``) whose pooled outputs the baselines read by default.

    * the MNIST reference CNN: the ReLU after each of its 4 convs and the 128-unit head ReLU;
    * the CIFAR ResNet-20: the stem ReLU and the 9 residual blocks (``net.layer1.0`` ...);
    * torchvision ResNets: ``net.layer1`` ... ``net.layer4``;
    * anything else: every ``nn.ReLU`` module (each must run once per forward pass).
    """
    from nad_guard.models import CifarResNet, MnistCNN

    net = getattr(model, "net", model)
    prefix = "net." if net is not model else ""
    if isinstance(net, MnistCNN):
        return [prefix + n for n in ("features.2", "features.5", "features.9", "features.12", "classifier.3")]
    if isinstance(net, CifarResNet):
        return [prefix + "relu"] + [f"{prefix}layer{i}.{j}" for i in (1, 2, 3) for j in range(len(net.layer1))]
    if all(hasattr(net, f"layer{i}") for i in (1, 2, 3, 4)):
        return [f"{prefix}layer{i}" for i in (1, 2, 3, 4)]
    relus = [prefix + n for n, m in net.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"no default layers for {type(net).__name__}; pass layer names explicitly "
                         "(see model.named_modules())")
    return relus


def _batches(images: ImagesLike, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, ImageSet):
        for x, _ in images.batches(batch_size):
            yield x
        return
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be an ImageSet or a float (N, C, H, W) tensor in [0, 1]")
    for s in range(0, len(images), batch_size):
        yield images[s:s + batch_size].float()


@torch.no_grad()
def extract_features(model: nn.Module, images: ImagesLike, layers: Sequence[str] | None = None, *,
                     batch_size: int = 256, device: str | torch.device = "cpu",
                     progress: bool = False) -> Features:
    """Pooled activations of ``layers`` (default :func:`default_layers`) and logits, in one forward
    pass per batch of ``images`` (an :class:`ImageSet` or float ``(N, C, H, W)`` in ``[0, 1]``).
    Memory of the pass is bounded by ``batch_size``; only the pooled ``(N, C)`` features are kept."""
    from tqdm.auto import tqdm

    layers = list(default_layers(model) if layers is None else layers)
    device = torch.device(device)
    model = model.to(device).eval()
    out: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    logits = []
    total = -(-len(images) // batch_size)
    with capture(model, layers) as store:
        for x in tqdm(_batches(images, batch_size), total=total, desc="features", disable=not progress,
                      leave=False):
            store.clear()
            logits.append(model(x.to(device)).float().cpu().numpy())
            for n in layers:
                out[n].append(store[n].cpu().numpy())
    if not logits:
        raise ValueError("no images")
    return Features({n: np.concatenate(v) for n, v in out.items()}, np.concatenate(logits))


def _labels_of(images: ImagesLike, labels: Any) -> np.ndarray:
    if labels is None:
        if isinstance(images, ImageSet):
            return images.labels.numpy()
        raise ValueError("labels are required when images is a tensor")
    return np.asarray(labels)


def _targets(features: Features | None, targets: Any) -> np.ndarray | None:
    if features is None and targets is None:
        return None
    if features is None or targets is None:
        raise ValueError("detector_features and detector_targets go together")
    t = np.asarray(targets).astype(int)
    if t.shape != (len(features),) or not np.isin(t, (0, 1)).all() or len(np.unique(t)) < 2:
        raise ValueError("detector_targets must be 0 (clean) / 1 (suspicious) per sample, with both present")
    return t


# --------------------------------------------------------------------------- base class

class BaseDetector(BaseEstimator, metaclass=ABCMeta):
    """Shared raw-input path. Subclasses implement ``fit_features`` and ``score_features``, and
    set ``uses_layers`` (False: logits are enough)."""

    uses_layers = True
    needs_labels = False

    def _layers_for(self, model: nn.Module) -> list[str]:
        layers = getattr(self, "layers", None)
        return list(default_layers(model) if layers is None else layers)

    def _extract(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                 device: str | torch.device) -> Features:
        return extract_features(model, images, layers if self.uses_layers else [], batch_size=batch_size,
                                device=device)

    def fit(self, model: nn.Module, images: ImagesLike, labels: Any = None, *, batch_size: int = 256,
            device: str | torch.device = "cpu", **kwargs: Any) -> "BaseDetector":
        """Extract features of clean training ``images`` and fit on them. Extra keyword arguments
        that end in ``_images`` are image sets too (e.g. ``detector_images``, ``calibration_images``);
        they become the matching ``_features`` argument of :meth:`fit_features` (and, for an
        :class:`ImageSet`, its labels the matching ``_labels`` argument when there is one)."""
        layers = self._layers_for(model) if self.uses_layers else []
        feats = self._extract(model, images, layers, batch_size, device)
        extra = dict(kwargs)
        for k, v in kwargs.items():
            if k.endswith("_images"):
                base = k[:-len("_images")]
                del extra[k]
                extra[base + "_features"] = None if v is None else self._extract(model, v, layers, batch_size, device)
                if isinstance(v, ImageSet) and extra.get(base + "_labels") is None \
                        and base + "_labels" in inspect.signature(self.fit_features).parameters:
                    extra[base + "_labels"] = v.labels.numpy()
        return self.fit_features(feats, _labels_of(images, labels) if self.needs_labels else labels, **extra)

    def score(self, model: nn.Module, images: ImagesLike, *, batch_size: int = 256,
              device: str | torch.device = "cpu") -> np.ndarray:
        """Suspicion score per image, ``(N,)``; higher = more suspicious."""
        check_is_fitted(self)
        layers = getattr(self, "layers_", []) if self.uses_layers else []
        return self.score_features(self._extract(model, images, layers, batch_size, device))

    @abstractmethod
    def fit_features(self, features: Features, labels: Any = None, **kwargs: Any) -> "BaseDetector":
        """Fit on precomputed features; every detector defines it."""

    @abstractmethod
    def score_features(self, features: Features) -> np.ndarray:
        """Suspicion scores from precomputed features (higher = more suspicious); every detector defines it."""

    def _select_layers(self, features: Features) -> list[str]:
        """The ``layers`` parameter (default: every layer of ``features``), checked against them."""
        layers = list(features.layers) if self.layers is None else list(self.layers)
        missing = [n for n in layers if n not in features.layers]
        if missing or not layers:
            raise ValueError(f"features lack the layers {missing}" if missing else "no layers to fit on")
        return layers

    def _check_layers(self, features: Features) -> None:
        missing = [n for n in self.layers_ if n not in features.layers]
        if missing:
            raise ValueError(f"features lack the layers {missing} this detector was fitted on")


def _logits(features: Features) -> torch.Tensor:
    if features.logits is None:
        raise ValueError("these features carry no logits")
    return torch.from_numpy(features.logits).double()


class MSP(BaseDetector):
    """1 - max softmax probability (of ``logits / temperature``). Needs no fitting."""

    uses_layers = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None, **kwargs: Any) -> "MSP":
        return self

    def fit_features(self, features: Features | None = None, labels: Any = None, **kwargs: Any) -> "MSP":
        return self

    def score_features(self, features: Features) -> np.ndarray:
        p = torch.softmax(_logits(features) / self.temperature, dim=1)
        return (1 - p.max(1).values).numpy()


class Energy(BaseDetector):
    """Energy ``-T * logsumexp(logits / T)``: higher (less negative) for unusual inputs. Needs no fitting."""

    uses_layers = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None,
            **kwargs: Any) -> "Energy":
        return self

    def fit_features(self, features: Features | None = None, labels: Any = None, **kwargs: Any) -> "Energy":
        return self

    def score_features(self, features: Features) -> np.ndarray:
        t = self.temperature
        return (-t * torch.logsumexp(_logits(features) / t, dim=1)).numpy()


def combiner(c: float) -> Pipeline:
    """The supervised baselines' combiner (Ma et al.; Lee et al.): standardise the per-layer scores, then a
    logistic regression with inverse regularisation ``c``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))


def _check_combine(combine: str) -> None:
    if combine not in ("logistic", "last"):
        raise ValueError(f"combine must be 'logistic' or 'last', got {combine!r}")


class Mahalanobis(BaseDetector):
    """Lee et al. (2018): class-conditional Gaussians with one shared covariance per layer.

    Per layer the feature is the smallest Mahalanobis distance to a class mean. ``combine=
    "logistic"`` learns a logistic regression across layers from labelled clean (0) vs adversarial
    (1) ``detector_features`` (as the paper, which trains it on part of the attack's data);
    ``combine="last"`` is the unsupervised version: the last layer's distance. ``noise > 0``
    enables the paper's input pre-processing (a signed-gradient step of that size in ``[0, 1]``
    pixel units that lowers the distance, per layer); it needs the raw-input path and costs a
    forward-backward pass per layer.

    Parameters: ``layers`` (module names, default :func:`default_layers`), ``combine``, ``noise``,
    ``C`` (inverse regularisation of the logistic regression).
    Fitted: ``layers_``, ``classes_``, ``means_`` (layer -> ``(K, C)``), ``precisions_``
    (layer -> ``(C, C)``, pseudo-inverse of the shared covariance), ``combiner_`` (or ``None``).
    """

    needs_labels = True

    def __init__(self, layers: Sequence[str] | None = None, combine: str = "logistic", noise: float = 0.0,
                 C: float = 1.0):
        self.layers = layers
        self.combine = combine
        self.noise = noise
        self.C = C

    def fit_features(self, features: Features, labels: Any = None, *, detector_features: Features | None = None,
                     detector_targets: Any = None) -> "Mahalanobis":
        """Gaussians from clean training ``features`` and their true ``labels``; the combiner from
        ``detector_features`` with ``detector_targets`` (0 clean, 1 adversarial)."""
        y = self._check_fit_args(features, labels, detector_features is not None)
        t = _targets(detector_features, detector_targets)
        self._fit_gaussians(features, y)
        self.combiner_ = None
        if self.combine == "logistic":
            self.combiner_ = combiner(self.C).fit(self.layer_scores(detector_features), t)
        return self

    def fit(self, model: nn.Module, images: ImagesLike, labels: Any = None, *,
            detector_images: ImagesLike | None = None, detector_targets: Any = None, batch_size: int = 256,
            device: str | torch.device = "cpu") -> "Mahalanobis":
        """Raw-input path: Gaussians from clean training ``images``; the combiner from
        ``detector_images`` (pre-processed when ``noise > 0``, as they will be when scored)."""
        feats = extract_features(model, images, self._layers_for(model), batch_size=batch_size, device=device)
        y = self._check_fit_args(feats, _labels_of(images, labels), detector_images is not None)
        self._fit_gaussians(feats, y)
        self.combiner_ = None
        if self.combine == "logistic":
            det = self._extract(model, detector_images, self.layers_, batch_size, device)
            self.combiner_ = combiner(self.C).fit(self.layer_scores(det), _targets(det, detector_targets))
        return self

    def _check_fit_args(self, features: Features, labels: Any, has_detector_data: bool) -> np.ndarray:
        _check_combine(self.combine)
        if labels is None:
            raise ValueError("Mahalanobis needs the training labels")
        y = np.asarray(labels)
        if y.shape != (len(features),):
            raise ValueError(f"labels must have shape ({len(features)},)")
        if self.combine == "logistic" and not has_detector_data:
            raise ValueError("combine='logistic' needs detector data (clean 0 / adversarial 1); "
                             "use combine='last' for the unsupervised version")
        return y

    def _fit_gaussians(self, features: Features, y: np.ndarray) -> None:
        layers = self._select_layers(features)
        classes = np.unique(y)
        means_, precisions_ = {}, {}
        for n in layers:
            x = features.layers[n].astype(np.float64)
            means = np.stack([x[y == c].mean(0) for c in classes])
            centred = x - means[np.searchsorted(classes, y)]
            cov = centred.T @ centred / len(x)
            means_[n], precisions_[n] = means, np.linalg.pinv(cov, hermitian=True)
        self.classes_, self.means_, self.precisions_, self.layers_ = classes, means_, precisions_, layers

    def _min_distance(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Smallest squared Mahalanobis distance of each row of ``x`` ``(n, C)`` to a class mean."""
        mu = torch.from_numpy(self.means_[layer]).to(x)
        prec = torch.from_numpy(self.precisions_[layer]).to(x)
        xp = x @ prec  # (x - mu)^T P (x - mu) expanded: memory (n, K), not (n, K, C)
        d = (xp * x).sum(1, keepdim=True) - 2 * xp @ mu.T + ((mu @ prec) * mu).sum(1)[None]
        return d.min(1).values.clamp_min(0)

    def layer_scores(self, features: Features) -> np.ndarray:
        """``(N, L)``: per fitted layer, the smallest Mahalanobis distance to a class mean."""
        check_is_fitted(self)
        self._check_layers(features)
        cols = [self._min_distance(torch.from_numpy(features.layers[n]).double(), n).numpy() for n in self.layers_]
        return np.stack(cols, axis=1)

    def score_features(self, features: Features) -> np.ndarray:
        d = self.layer_scores(features)
        if self.combiner_ is not None:
            return self.combiner_.decision_function(d)
        return d[:, -1]

    # raw path with input pre-processing
    def _extract(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                 device: str | torch.device) -> Features:
        if self.noise == 0 or not hasattr(self, "means_"):  # Gaussians not fitted yet: plain features
            return super()._extract(model, images, layers, batch_size, device)
        return self._preprocessed(model, images, layers, batch_size, device)

    def _preprocessed(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                      device: str | torch.device) -> Features:
        """Features where each layer's entry is read at the input moved by ``noise`` against the
        gradient of that layer's distance (one forward-backward and one forward pass per layer)."""
        device = torch.device(device)
        model = model.to(device).eval()
        out: dict[str, list[np.ndarray]] = {n: [] for n in layers}
        logits = []
        for x in _batches(images, batch_size):
            x = x.to(device)
            with torch.no_grad():
                logits.append(model(x).float().cpu().numpy())
            for n in layers:
                xg = x.clone().requires_grad_(True)
                with capture(model, [n], detach=False) as store, torch.enable_grad():
                    model(xg)
                    d = self._min_distance(store[n].double(), n)
                    (grad,) = torch.autograd.grad(d.sum(), xg)
                x2 = (x - self.noise * grad.sign()).clamp(0, 1)
                with capture(model, [n]) as store, torch.no_grad():
                    model(x2)
                    out[n].append(store[n].cpu().numpy())
        return Features({n: np.concatenate(v) for n, v in out.items()}, np.concatenate(logits))


def _knn_distances(queries: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 1024,
                   exclude_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest reference rows of each query, in query chunks."""
    dists, idxs = [], []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(queries[s:s + chunk], reference)
        if exclude_zero:
            d = d.masked_fill(d <= 0, float("inf"))
        v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idxs.append(i)
    if not dists:
        return torch.zeros(0, k, dtype=reference.dtype), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)


class LID(BaseDetector):
    """Ma et al. (2018): local intrinsic dimensionality of each layer's activations.

    ``LID(x) = -(mean_i log(r_i / r_k))^-1`` over the distances ``r_1 <= ... <= r_k`` from ``x``
    to its ``k`` nearest neighbours. The paper takes neighbours inside the current minibatch,
    which makes a sample's score depend on its batch; here they come from a fixed reference set
    of ``n_reference`` clean training activations (seeded draw), so scores are per-sample. Exact
    duplicates of a reference point (distance 0) are not counted as neighbours.

    ``combine="logistic"`` learns a logistic regression across layers from ``detector_features``
    / ``detector_targets``; ``combine="last"`` uses the last layer's LID.
    Fitted: ``layers_``, ``reference_`` (layer -> ``(R, C)`` float32), ``combiner_``.
    """

    def __init__(self, layers: Sequence[str] | None = None, k: int = 20, n_reference: int = 1000,
                 combine: str = "logistic", C: float = 1.0, random_state: int = 0):
        self.layers = layers
        self.k = k
        self.n_reference = n_reference
        self.combine = combine
        self.C = C
        self.random_state = random_state

    def fit_features(self, features: Features, labels: Any = None, *, detector_features: Features | None = None,
                     detector_targets: Any = None) -> "LID":
        """Reference set from clean training ``features`` (labels unused); combiner as in
        :class:`Mahalanobis`."""
        _check_combine(self.combine)
        t = _targets(detector_features, detector_targets)
        if self.combine == "logistic" and t is None:
            raise ValueError("combine='logistic' needs detector_features and detector_targets "
                             "(clean 0 / adversarial 1); use combine='last' for the unsupervised version")
        n = len(features)
        if n < self.k + 1:
            raise ValueError(f"need more than k={self.k} reference samples, got {n}")
        rng = np.random.default_rng(self.random_state)
        pick = np.sort(rng.choice(n, size=min(self.n_reference, n), replace=False))
        layers = self._select_layers(features)
        self.reference_ = {name: np.ascontiguousarray(features.layers[name][pick]) for name in layers}
        self.layers_ = layers
        self.combiner_ = None
        if t is not None and self.combine == "logistic":
            self.combiner_ = combiner(self.C).fit(self.layer_scores(detector_features), t)
        return self

    def layer_scores(self, features: Features) -> np.ndarray:
        """``(N, L)``: each sample's LID estimate at each fitted layer."""
        check_is_fitted(self)
        self._check_layers(features)
        cols = []
        for name in self.layers_:
            r, _ = _knn_distances(torch.from_numpy(features.layers[name]).double(),
                                  torch.from_numpy(self.reference_[name]).double(), self.k, exclude_zero=True)
            r = r.clamp_min(1e-12)
            mean_log = torch.log(r / r[:, -1:]).mean(1)
            lid = -1.0 / mean_log.clamp_max(-1e-12)
            cols.append(torch.nan_to_num(lid, nan=0.0, posinf=1e12).numpy())
        return np.stack(cols, axis=1)

    def score_features(self, features: Features) -> np.ndarray:
        s = self.layer_scores(features)
        if self.combiner_ is not None:
            return self.combiner_.decision_function(s)
        return s[:, -1]


class DeepKNN(BaseDetector):
    """Papernot & McDaniel (2018): deep k-nearest neighbours with conformal calibration.

    For a candidate label ``j``, nonconformity ``alpha(x, j)`` = number of the ``k`` nearest
    training neighbours, summed over layers, whose label is not ``j``. The calibration set (held
    out from the kNN training data) gives ``A = {alpha(x_c, y_c)}``; the p-value of ``j`` is
    ``(#{a in A: a >= alpha(x, j)} + 1) / (|A| + 1)`` (:func:`nad_guard.calibration.p_values`, the
    formula of nad-guard's own trust score).

    ``label="predicted"``: score = 1 - p-value of the classifier's predicted label (needs logits);
    ``label="credibility"``: score = 1 - max_j p-value (the paper's credibility).
    Calibration data: ``calibration_features`` / ``calibration_labels`` at fit, or else a seeded
    ``calibration_size`` share split off the training features. ``metric`` "euclidean" or
    "cosine" (rows L2-normalised first).
    Fitted: ``layers_``, ``train_`` (layer -> ``(N, C)``), ``train_labels_``, ``n_classes_``,
    ``calibration_scores_`` (sorted ``A``).
    """

    needs_labels = True

    def __init__(self, layers: Sequence[str] | None = None, k: int = 75, label: str = "predicted",
                 metric: str = "euclidean", calibration_size: float = 0.1, random_state: int = 0):
        self.layers = layers
        self.k = k
        self.label = label
        self.metric = metric
        self.calibration_size = calibration_size
        self.random_state = random_state

    def _prep(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        return torch.nn.functional.normalize(t, dim=1) if self.metric == "cosine" else t

    def fit_features(self, features: Features, labels: Any = None, *,
                     calibration_features: Features | None = None, calibration_labels: Any = None) -> "DeepKNN":
        if self.label not in ("predicted", "credibility"):
            raise ValueError(f"label must be 'predicted' or 'credibility', got {self.label!r}")
        if self.metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {self.metric!r}")
        if labels is None:
            raise ValueError("DeepKNN needs the training labels")
        y = np.asarray(labels).astype(np.int64)
        if y.shape != (len(features),):
            raise ValueError(f"labels must have shape ({len(features)},)")
        if (calibration_features is None) != (calibration_labels is None):
            raise ValueError("calibration_features and calibration_labels go together")
        if calibration_features is None:
            rng = np.random.default_rng(self.random_state)
            perm = rng.permutation(len(y))
            n_cal = max(1, int(round(self.calibration_size * len(y))))
            cal, train = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
            calibration_features, calibration_labels = features.subset(cal), y[cal]
            features, y = features.subset(train), y[train]
        if len(y) < self.k:
            raise ValueError(f"need at least k={self.k} training samples, got {len(y)}")
        layers = self._select_layers(features)
        n_classes = int(y.max()) + 1
        if features.logits is not None:
            n_classes = max(n_classes, features.logits.shape[1])
        self.layers_ = layers
        self.train_ = {n: self._prep(features.layers[n]) for n in layers}
        self.train_labels_ = torch.from_numpy(y)
        self.n_classes_ = n_classes
        cal_y = torch.as_tensor(np.asarray(calibration_labels).astype(np.int64))
        alpha = self.nonconformity(calibration_features)
        self.calibration_scores_ = np.sort(alpha.gather(1, cal_y[:, None]).squeeze(1).numpy())
        return self

    def nonconformity(self, features: Features) -> torch.Tensor:
        """``(N, n_classes)``: for every candidate label, neighbours disagreeing with it, summed over layers."""
        check_is_fitted(self, "train_")
        self._check_layers(features)
        counts = torch.zeros(len(features), self.n_classes_, dtype=torch.float64)
        for n in self.layers_:
            _, idx = _knn_distances(self._prep(features.layers[n]), self.train_[n], self.k)
            lab = self.train_labels_[idx]  # (N, k)
            counts.scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float64))
        return len(self.layers_) * self.k - counts

    def p_values(self, features: Features) -> np.ndarray:
        """``(N, n_classes)`` conformal p-values of every label."""
        check_is_fitted(self)
        return p_values(self.calibration_scores_, self.nonconformity(features).numpy())

    def score_features(self, features: Features) -> np.ndarray:
        p = self.p_values(features)
        if self.label == "credibility":
            return 1 - p.max(1)
        pred = features.predictions()
        return 1 - p[np.arange(len(p)), pred]


DETECTORS = {"msp": MSP, "energy": Energy, "mahalanobis": Mahalanobis, "lid": LID, "deep-knn": DeepKNN}
