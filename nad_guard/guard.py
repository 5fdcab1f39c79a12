"""A guard: classifier + class sub-architectures + a calibrated detector, in one directory.

:class:`Guard` answers, for a batch of images ``(N, C, H, W)`` float in ``[0, 1]``, the prediction and
whether to trust it, from one forward pass of the classifier (the path features are read from the
predicting pass; see :mod:`nad_guard.paths`).

The detector's input rows come from the path features (:mod:`nad_guard.encoding`).

Per-layer *divergence* reported to users is ``1 - mass_share``: the share of the layer's pooled
activation that lies outside the predicted class's sub-architecture (0 = entirely inside).

Artifact layout (one directory): ``meta.json`` and ``paths.safetensors`` (:class:`PathModel`),
``classifier.safetensors`` (the classifier's weights) with ``meta["classifier"]`` saying how to
rebuild it (:func:`classifier_reference`: a reference model or torchvision architecture by name, a
factory by its ``package.module:function``, an exported program by a copy of its file,
``classifier_graph.pt2``, and the original's name and SHA-256; written by :func:`save_classifier`, also
into a path artifact by ``fit-paths``, so that later commands and the service need only the directory),
and ``detector.skops`` with ``meta["detector"]`` (method, encoding, threshold, metrics, the
calibration's size and false-positive bounds under ``calibration`` (:mod:`nad_guard.calibration`), and,
for detectors fitted by ``fit-detector`` / ``build-default``, which images each holdout part holds under
``provenance`` (:mod:`nad_guard.provenance`)). A guard with an error detector (:mod:`nad_guard.errors`) adds
``error_detector.skops`` with ``meta["error_detector"]`` (method, its cross-validated selection, threshold,
calibration) and ``meta["decision"]`` (the requested rate and its split between the two detectors); its
records then carry ``attack_p_value``, ``error_p_value``, ``error_score`` and ``error_threshold``, and
``trust_score`` / ``is_suspicious`` are the combined ones. Guards without one answer as before, without
those fields. A guard with a deep detector (:mod:`nad_guard.deep`: ``deep_detector.skops`` and
``meta["deep"]``) also answers in deep mode (``run(..., deep=True)``); its records then say ``mode: "deep"``
and ``probes: k``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nad_guard.deep import DEEP_DETECTOR_FILE, deep_record, deep_rows, deep_step, load_deep, save_deep
from nad_guard.detectors import PathDetector, load_detector, save_detector
from nad_guard.errors import DEFAULT_ATTACK_SHARE, SOFTMAX_COLUMNS, ErrorDetector, combined_trust, error_rows
from nad_guard.models import (REFERENCE_MODELS, Classifier, InputSpec, load_state_dict_file, resolve_device,
                              torchvision_classifier)
from nad_guard.model_names import build_classifier, classifier_from_factory, file_sha256, load_torchscript
from nad_guard.encoding import ENCODINGS, detector_input
from nad_guard.paths import META_FILE, ArtifactError, PathFeatures, PathModel, read_meta
from nad_guard.probes import ProbeSpec, probe_column_names

DEFAULT_GUARD_DIR = Path(__file__).resolve().parent / "default_guard"
PAD_MULTIPLE = 8  # rows: see pad_rows
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_GRAPH = "classifier_graph"  # + the graph file's suffix: the copy of an exported program
DETECTOR_FILE = "detector.skops"
ERROR_DETECTOR_FILE = "error_detector.skops"  # guards with an error detector only (nad_guard.errors)


class ModelRecordWarning(UserWarning):
    """``--model`` names another classifier than the one the artifact records (used as given)."""


def pad_rows(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, int]:
    """``(x padded with zero images to a multiple of `multiple` rows, the original row count)``.

    CPU kernels compute a row slightly differently (last bits) depending on the batch's size: measured
    on this project's 2-core machines, the MNIST CNN's logits for a row differ in batches of 2-3 rows
    (1 torch thread) or 2-3, 5-7 and 9-11 rows (2 threads) from those in a batch of 8, and in no batch
    whose size is a multiple of 8 (up to 256). Forward passes on padded batches make an input's result
    bit-identical whatever it is batched with (the service merges concurrent requests)."""
    n = len(x)
    pad = (-n) % max(1, multiple)
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return x, n


def forward_step(batch_size: int, pad_multiple: int = PAD_MULTIPLE) -> int:
    """Rows per forward pass: ``batch_size`` rounded down to a multiple of ``pad_multiple`` (at least one
    multiple), so that every pass of a padded batch (:func:`pad_rows`) is itself a multiple."""
    m = max(1, pad_multiple)
    return max(m, batch_size - batch_size % m)


def resolve_guard_dir(guard: str | Path) -> Path:
    """``"default"`` -> the bundled default guard; otherwise the path, which must be a directory
    (:class:`ArtifactError`, saying what a guard directory holds, otherwise)."""
    if str(guard) == "default":
        return DEFAULT_GUARD_DIR
    path = Path(guard)
    holds = "meta.json, paths.safetensors, classifier.safetensors, detector.skops"
    if not path.exists():
        raise ArtifactError(f"guard directory {path} does not exist; pass a guard written by `nad-guard fit-detector` "
                            f"({holds}) or 'default'")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; a guard is a directory ({holds}) or 'default'")
    return path


def read_guard_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a guard directory, read without loading any weights, and checked: a path artifact
    this library reads (:func:`~nad_guard.paths.read_meta`) that also holds a classifier record with a
    valid input spec and a detector record. The one reader of a guard's metadata (the guard, the service
    and the command line use it); :class:`ArtifactError` says what is missing."""
    path = Path(path)
    meta = read_meta(path)
    ref, det_meta = meta.get("classifier"), meta.get("detector")
    if not isinstance(ref, dict) or not isinstance(det_meta, dict):
        raise ArtifactError(f"{path} holds paths but no {'classifier' if not isinstance(ref, dict) else 'detector'}"
                            "; build the guard with `nad-guard fit-detector`")
    try:
        InputSpec.from_dict(ref["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path / META_FILE} has no valid classifier spec ({e!r}); build the guard with "
                            "`nad-guard fit-detector`") from e
    return meta


def classifier_reference(clf: Classifier) -> dict[str, Any]:
    """How to rebuild ``clf`` (the weights are stored beside it): ``builder`` (``reference``,
    ``torchvision``, ``factory``, ``graph`` or ``custom``: a module wrapped by hand, which cannot be
    rebuilt), ``name``, ``model`` (what ``--model`` takes for it; absent for ``custom``), ``spec``, and
    ``factory`` (``package.module:function``) or ``format``, ``graph`` (the copy's file name in the
    directory) and ``sha256`` (the graph file's)."""
    spec, src = clf.spec.to_dict(), clf.source or {}
    if src.get("builder") == "factory":
        return {"builder": "factory", "name": clf.name, "model": src["factory"], "factory": src["factory"],
                "spec": spec}
    if src.get("builder") == "graph":
        original = Path(src["path"])
        return {"builder": "graph", "name": clf.name, "model": src.get("model") or original.name,
                "format": src["format"], "graph": CLASSIFIER_GRAPH + original.suffix, "sha256": src["sha256"],
                "spec": spec}
    if clf.name in REFERENCE_MODELS:
        return {"builder": "reference", "name": clf.name, "model": clf.name, "spec": spec}
    import torchvision

    if clf.name in torchvision.models.list_models(module=torchvision.models):
        return {"builder": "torchvision", "name": clf.name, "model": clf.name, "spec": spec}
    return {"builder": "custom", "name": clf.name, "spec": spec}


def _identity(ref: dict[str, Any]) -> tuple[str, str]:
    """What makes two records the same classifier: the factory, the graph's bytes, or the name."""
    builder = str(ref.get("builder"))
    return builder, str(ref.get({"factory": "factory", "graph": "sha256"}.get(builder, "name")))


def save_classifier(path: str | Path, clf: Classifier) -> dict[str, Any]:
    """Store ``clf`` in the artifact directory ``path`` (written by :meth:`PathModel.save`): its weights
    (``classifier.safetensors``), for a graph file a copy of it (the directory is self-contained), and
    ``meta["classifier"]``, the record :func:`rebuild_classifier` reads. Returns the record."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = read_meta(path)
    ref = {**classifier_reference(clf), "file": CLASSIFIER_FILE}
    save_file({k: v.detach().cpu().contiguous() for k, v in clf.net.state_dict().items()}, str(path / CLASSIFIER_FILE))
    for stale in path.glob(CLASSIFIER_GRAPH + ".*"):
        if stale.name != ref.get("graph"):
            stale.unlink()
    copy = path / ref["graph"] if ref["builder"] == "graph" else None
    if copy is not None and not (copy.is_file() and file_sha256(copy) == ref["sha256"]):
        shutil.copyfile(clf.source["path"], copy)
        if file_sha256(copy) != ref["sha256"]:
            copy.unlink()
            raise ValueError(f"{clf.source['path']} changed since the classifier was loaded from it (SHA-256 "
                             "differs); load it again")
    meta["classifier"] = ref
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return ref


def rebuild_classifier(path: str | Path, ref: dict[str, Any] | None = None) -> Classifier:
    """The classifier an artifact or guard directory records (``ref``, default ``meta["classifier"]``),
    with the weights stored there: a reference or torchvision model by name, a factory by importing its
    ``package.module:function`` (its module must be importable: on ``PYTHONPATH``), a graph file from the
    directory's copy (checked against the recorded SHA-256). :class:`ArtifactError` says what is missing;
    a ``custom`` record (a module wrapped by hand) cannot be rebuilt."""
    path = Path(path)
    if ref is None:
        ref = read_meta(path).get("classifier")
    if not isinstance(ref, dict):
        raise ArtifactError(f"{path} does not record its classifier (written before nad-guard recorded it, or "
                            "by PathModel.save alone): name it with --model (and --weights) as given to fit-paths")
    spec = InputSpec.from_dict(ref["spec"])
    builder, weights = ref.get("builder"), path / ref.get("file", CLASSIFIER_FILE)
    if builder == "reference":
        clf = REFERENCE_MODELS[ref["name"]](spec.class_names)
    elif builder == "torchvision":
        clf = torchvision_classifier(ref["name"], len(spec.class_names), input_size=spec.height,
                                     channels=spec.channels, mean=spec.mean, std=spec.std,
                                     class_names=spec.class_names)
    elif builder == "factory":
        try:
            clf = classifier_from_factory(ref["factory"])
        except ValueError as e:
            raise ArtifactError(f"{path} records its classifier as the factory {ref['factory']}: {e}") from e
    elif builder == "graph":
        graph = path / ref["graph"]
        if not graph.is_file():
            raise ArtifactError(f"{graph} is missing: the guard's copy of {ref.get('model')}")
        if file_sha256(graph) != ref.get("sha256"):
            raise ArtifactError(f"{graph} is not the graph the guard was fitted for (SHA-256 differs from "
                                f"the recorded one of {ref.get('model')})")
        clf = load_torchscript(graph, spec)
        clf.name, clf.source["model"] = ref.get("name", clf.name), ref.get("model")
        return clf  # the graph file holds its own weights
    elif builder == "custom":
        raise ArtifactError(f"{path} was built for a classifier wrapped by hand ({ref['name']!r}), which cannot be "
                            "rebuilt from the directory: pass it (Guard.load(..., classifier=...), --model "
                            "package.module:function, service: NAD_GUARD_CLASSIFIER=package.module:function), or "
                            "fit with --model package.module:function so that the guard records its factory")
    else:
        raise ArtifactError(f"unknown classifier builder {builder!r}")
    sd = load_state_dict_file(weights)
    try:
        clf.net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{weights} does not fit {ref.get('model') or ref['name']}: {str(e)[:300]}") from e
    return clf


def artifact_classifier(path: str | Path, model: str | None = None, weights: str | Path | None = None, *,
                        mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None,
                        class_names: Sequence[str] | None = None, input_size: int | None = None,
                        channels: int | None = None) -> Classifier:
    """The classifier for the path artifact or guard at ``path``, as every command after ``fit-paths``
    gets it: without ``model``, the one the directory records (:func:`rebuild_classifier`); with it,
    :func:`~nad_guard.model_names.build_classifier` (``class_names``, ``input_size`` and ``channels`` default
    to the artifact's; ``mean``/``std`` to the record's when ``model`` is the recorded one; without
    ``weights``, the weights the directory stores, when it records a classifier). A ``model`` other than
    the recorded one is used as given, with a :class:`ModelRecordWarning`: the artifact's weights
    fingerprint still has to match (:meth:`PathModel.load` checks it), so a renamed factory module or a
    moved file keeps working, and another network does not."""
    path = Path(path)
    meta = read_meta(path)
    ref = meta.get("classifier") if isinstance(meta.get("classifier"), dict) else None
    if model is None:
        if weights is not None or mean is not None or std is not None:
            raise ValueError("--weights, --mean and --std go with --model; without --model the classifier "
                             f"that {path} records is rebuilt with its stored weights")
        return rebuild_classifier(path, ref)
    recorded = dict(meta.get("model", {}).get("input_spec") or {})
    if (ref is not None and ref.get("builder") in ("torchvision", "graph") and ref.get("model") == Path(model).name
            and mean is None and std is None):
        mean, std = recorded.get("mean"), recorded.get("std")
    clf = build_classifier(model, weights, class_names=class_names or meta.get("class_names") or [],
                           input_size=input_size or int(recorded.get("height", 0)),
                           channels=channels or recorded.get("channels"), mean=mean, std=std)
    stored = path / str(ref.get("file", CLASSIFIER_FILE)) if ref is not None else None
    if weights is None and stored is not None and stored.is_file():
        try:
            clf.net.load_state_dict(load_state_dict_file(stored), strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"the classifier weights {path} stores do not fit --model {model} "
                                f"({str(e)[:200]}); give the model's --weights") from e
    if ref is not None and ref.get("builder") != "custom" and _identity(classifier_reference(clf)) != _identity(ref):
        warnings.warn(ModelRecordWarning(
            f"--model {model} is not the classifier {path} records ({ref.get('model') or ref.get('name')}); "
            "using --model as given (its weights must still be the artifact's), and a guard saved from it "
            "records it instead"), stacklevel=2)
    return clf


@dataclass
class GuardResult:
    """Results for a batch; every field has the batch as its first dimension."""

    features: PathFeatures
    score: np.ndarray       # (N,) higher = more suspicious (the attack detector's, in a two-detector guard)
    trust: np.ndarray       # (N,) conformal p-value in (0, 1], higher = more trustworthy (combined)
    flag: np.ndarray        # (N,) bool, score > threshold (or, two detectors, either detector's flag)
    threshold: float
    # a guard with an error detector (nad_guard.errors) only; None otherwise
    attack_trust: np.ndarray | None = None  # (N,) the attack detector's p-value
    error_score: np.ndarray | None = None   # (N,) the error detector's score, higher = more likely wrong
    error_trust: np.ndarray | None = None   # (N,) the error detector's p-value
    error_threshold: float | None = None
    probes: int | None = None  # deep mode only (nad_guard.deep): the probes per input; None in single-pass mode

    def records(self, class_names: list[str]) -> list[dict[str, Any]]:
        """One JSON-ready dict per input (the service's response items). Tensors are converted once per
        batch; the per-input loop only builds dicts of Python numbers."""
        f = self.features
        pred = f.pred.tolist()
        confidence = f.logits.softmax(1).gather(1, f.pred[:, None]).squeeze(1).tolist()
        nearest = f.nearest_path_class.tolist()
        divergence = (1 - f.mass_share).tolist()
        layer_nearest, margin = f.nearest_class.tolist(), f.margin.tolist()
        trust, score, flag = self.trust.tolist(), self.score.tolist(), self.flag.tolist()
        threshold = float(self.threshold)
        records = [{
            "label": p, "class_name": class_names[p], "confidence": c, "trust_score": t,
            "suspicion_score": sc, "is_suspicious": bool(fl), "threshold": threshold,
            "nearest_path_class": nr, "nearest_path_class_name": class_names[nr],
            "per_layer": [{"layer": name, "divergence": dv, "nearest_class": nc, "margin": mg}
                          for name, dv, nc, mg in zip(f.layers, div_i, nc_i, mg_i)],
        } for p, c, t, sc, fl, nr, div_i, nc_i, mg_i in zip(pred, confidence, trust, score, flag, nearest, divergence,
                                                           layer_nearest, margin)]
        if self.error_trust is not None:  # a two-detector guard: both p-values (absent otherwise)
            err_threshold = float(self.error_threshold)
            for r, pa, pe, se in zip(records, self.attack_trust.tolist(), self.error_trust.tolist(),
                                     self.error_score.tolist()):
                r.update(attack_p_value=pa, error_p_value=pe, error_score=se, error_threshold=err_threshold)
        if self.probes is not None:
            for r in records:
                r.update(mode="deep", probes=self.probes)
        return records


class Guard:
    """Classifier + :class:`PathModel` + fitted, calibrated :class:`PathDetector`.

    ``nearest_path_class`` in results is the class whose sub-architecture is nearest to the input's
    whole path (:attr:`PathFeatures.nearest_path_class`: the argmax over classes of the class scores
    averaged over gate points).
    """

    def __init__(self, paths: PathModel, detector: PathDetector, encoding: str = "rich",
                 meta: dict[str, Any] | None = None, error_detector: ErrorDetector | None = None,
                 attack_share: float = DEFAULT_ATTACK_SHARE, deep_detector: PathDetector | None = None,
                 probes: ProbeSpec | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if (deep_detector is None) != (probes is None or probes.k < 1):
            raise ValueError("a deep detector goes with its probes (a ProbeSpec with k >= 1), and they with it")
        for d in (detector, error_detector, deep_detector):
            if d is not None and not hasattr(d, "threshold_"):
                raise ValueError("a detector has no threshold: call infer_threshold on held-out clean features")
        if not 0 < attack_share < 1:
            raise ValueError(f"attack_share must be in (0, 1), got {attack_share}")
        self.paths, self.detector, self.encoding = paths, detector, encoding
        self.error_detector, self.attack_share = error_detector, float(attack_share)
        self.deep_detector, self.probes = deep_detector, probes
        self.meta = dict(meta or {})

    @property
    def fpr(self) -> float:
        """The false-positive rate the guard's flag is calibrated at (a two-detector guard: the sum of its
        detectors' shares, :mod:`nad_guard.errors`)."""
        return self.detector.fpr_ + (self.error_detector.fpr_ if self.error_detector is not None else 0.0)

    @property
    def classifier(self) -> Classifier:
        return self.paths.classifier

    def to(self, device: str | torch.device) -> "Guard":
        self.classifier.to(resolve_device(str(device)) if isinstance(device, str) else device)
        return self

    @property
    def deep_k(self) -> int:
        """The probes per input of deep mode (:mod:`nad_guard.deep`); 0 when the guard has no deep detector."""
        return self.probes.k if self.deep_detector is not None and self.probes is not None else 0

    def run(self, x: torch.Tensor, batch_size: int = 256, pad_multiple: int = PAD_MULTIPLE, deep: bool = False
            ) -> GuardResult:
        """Predict and score ``x`` float ``(N, C, H, W)`` in ``[0, 1]`` (one forward pass per batch of
        ``batch_size``, rounded to a multiple of ``pad_multiple``). Every pass is padded with zero images to
        a multiple of ``pad_multiple`` rows (:func:`pad_rows`), so a result does not depend on the batch
        it came in; ``pad_multiple=1`` turns that off. ``deep``: the deep check (:mod:`nad_guard.deep`; a
        ``ValueError`` for a guard without a deep detector): one pass of the inputs and their ``k`` probes per
        :func:`~nad_guard.deep.deep_step` inputs, and the deep detector's score in the attack detector's place."""
        if deep and not self.deep_k:
            raise ValueError("this guard has no deep detector (deep mode): fit one with `nad-guard fit-detector "
                             "--probes K`, or run without deep")
        x, n = pad_rows(x, pad_multiple)
        det = self.deep_detector if deep else self.detector
        if deep:
            f, X, rows = deep_rows(self.paths, x, self.encoding, self.probes,
                                   deep_step(batch_size, self.deep_k, pad_multiple))
        else:
            f, X = detector_input(self.paths, x, self.encoding, forward_step(batch_size, pad_multiple))
            rows = X
        s = det.score_samples(rows)[:n]
        trust, flag = det.trust_of_scores(s), s > det.threshold_
        probes = self.deep_k if deep else None
        if self.error_detector is None:
            return GuardResult(f.rows(slice(0, n)), s, trust, flag, det.threshold_, probes=probes)
        e = self.error_detector.score_samples(error_rows(f.logits[:n], X[:n]))
        e_trust = self.error_detector.trust_of_scores(e)
        return GuardResult(f.rows(slice(0, n)), s, combined_trust(trust, e_trust, self.attack_share),
                           flag | (e > self.error_detector.threshold_), det.threshold_,
                           attack_trust=trust, error_score=e, error_trust=e_trust,
                           error_threshold=self.error_detector.threshold_, probes=probes)

    def probabilities(self, x: torch.Tensor, batch_size: int = 256, pad_multiple: int = PAD_MULTIPLE
                      ) -> torch.Tensor:
        """The classifier's softmax ``(N, K)`` for ``x`` alone (no paths, no trust score), with the same
        padded passes as :meth:`run`, so a row's result does not depend on the batch it came in."""
        clf = self.classifier
        x, n = pad_rows(x, pad_multiple)
        step = forward_step(batch_size, pad_multiple)
        with torch.no_grad():
            return torch.cat([clf(x[i:i + step].to(clf.mean.device)).softmax(1).float().cpu()
                              for i in range(0, len(x), step)])[:n]

    def predict(self, x: torch.Tensor, batch_size: int = 256) -> list[dict[str, Any]]:
        return self.run(x, batch_size).records(self.classifier.class_names)

    # ---- artifact
    def save(self, path: str | Path, detector_info: dict[str, Any] | None = None) -> Path:
        path = self.paths.save(path)
        save_classifier(path, self.classifier)
        save_detector(self.detector, path / DETECTOR_FILE)
        meta = json.loads((path / META_FILE).read_text())
        meta["detector"] = {"file": DETECTOR_FILE, "method": self.detector.method, "encoding": self.encoding,
                            "threshold": self.detector.threshold_, "fpr": self.detector.fpr_,
                            "n_features": int(self.detector.n_features_in_),
                            "calibration": self.detector.calibration().to_dict(),
                            **(detector_info or self.meta.get("detector_info", {}))}
        meta.pop("error_detector", None)
        meta.pop("decision", None)
        (path / ERROR_DETECTOR_FILE).unlink(missing_ok=True)
        if self.error_detector is not None:
            save_detector(self.error_detector, path / ERROR_DETECTOR_FILE)
            meta["error_detector"] = {"file": ERROR_DETECTOR_FILE, "method": self.error_detector.method,
                                      "threshold": self.error_detector.threshold_, "fpr": self.error_detector.fpr_,
                                      "n_features": int(self.error_detector.n_features_in_),
                                      "calibration": self.error_detector.calibration().to_dict(),
                                      **self.meta.get("error_detector_info", {})}
            meta["decision"] = {"fpr": self.fpr, "attack_share": self.attack_share,
                                "rule": "flagged if p_attack <= attack_share * fpr or p_error <= (1 - attack_share) "
                                        "* fpr (union bound: clean inputs flagged at most fpr); trust_score = "
                                        "min(1, p_attack / attack_share, p_error / (1 - attack_share))"}
        meta.pop("deep", None)
        (path / DEEP_DETECTOR_FILE).unlink(missing_ok=True)
        if self.deep_k:
            save_deep(self.deep_detector, path)
            meta["deep"] = deep_record(self.deep_detector, self.probes, self.encoding, self.paths.layer_names_,
                                       self.meta.get("deep_info"))
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", classifier: Classifier | None = None) -> "Guard":
        """Load a guard directory; raises :class:`ArtifactError` with a clear message if anything is
        missing, corrupt or inconsistent. The classifier is rebuilt from the directory's record
        (:func:`rebuild_classifier`: a factory's module must be importable) unless ``classifier`` is
        given, which replaces it (needed for classifiers wrapped by hand); its weights must match."""
        path = Path(path)
        meta = read_guard_meta(path)
        ref, det_meta = meta["classifier"], meta["detector"]
        try:
            clf = classifier or rebuild_classifier(path, ref)
            paths = PathModel.load(path, clf)
            det = load_detector(path / det_meta.get("file", DETECTOR_FILE))
            err_meta = meta.get("error_detector")
            err = load_detector(path / err_meta.get("file", ERROR_DETECTOR_FILE)) if err_meta else None
            if err is not None and not isinstance(err, ErrorDetector):
                raise ValueError(f"{err_meta.get('file')} holds a {type(err).__name__}, not an ErrorDetector")
            share = float(meta.get("decision", {}).get("attack_share", DEFAULT_ATTACK_SHARE))
            deep, probes = load_deep(path, meta.get("deep"))
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            raise ArtifactError(f"cannot load guard {path}: {e}") from e
        guard = cls(paths, det, det_meta.get("encoding", "rich"), meta, error_detector=err, attack_share=share,
                    deep_detector=deep, probes=probes)
        n = len(detector_input(paths, torch.zeros(1, *clf.spec.shape), guard.encoding)[1][0])
        if n != det.n_features_in_:
            raise ArtifactError(f"detector in {path} expects {det.n_features_in_} features, the paths give {n}")
        if err is not None and err.n_features_in_ != n + len(SOFTMAX_COLUMNS):
            raise ArtifactError(f"error detector in {path} expects {err.n_features_in_} features, the paths give "
                                f"{n + len(SOFTMAX_COLUMNS)}")
        n_deep = n + len(probe_column_names(paths.layer_names_, probes)) if probes is not None else 0
        if deep is not None and deep.n_features_in_ != n_deep:
            raise ArtifactError(f"deep detector in {path} expects {deep.n_features_in_} features, the paths and its "
                                f"probes give {n_deep}")
        return guard.to(device)
