"""A guard's health report (``nad-guard check GUARD``): is each part of it sound, in words.

What it reads, and from where:

* **gate points** (``meta.json["layers"]``): how many, and, when the classifier can be rebuilt, how
  much of the network's depth they cover (:func:`depth_covered`); fewer than :data:`MIN_GATE_POINTS`
  points or less than :data:`MIN_DEPTH` of the depth is weak (the path features see only the start of
  the network);
* **masks** (``paths.safetensors``): each class's kept fraction per gate point, and the rule of
  :func:`mask_problems`, the same one ``fit-paths`` applies before it saves (a gate point that keeps every
  channel, or none, for every class; a class whose subnetwork misses :data:`MIN_SUBNET_ACCURACY` of its
  correctly classified images; the accuracies come from the artifact's metrics);
* **calibration** (``meta.json["detector"]["calibration"]``, :mod:`nad_guard.calibration`): ``n`` and
  the false-positive bounds; an inadequate calibration set warns;
* **the detector's cross-validated AUROC per training attack** (``meta.json["detector"]["cv_per_attack"]``,
  computed when the detector is fitted, :func:`nad_guard.detectors.cross_val_auroc_per_block`, so no
  attack is regenerated here); an attack below :data:`WEAK_AUROC` warns;
* **never-seen images** (:func:`measure_unseen`, needs the data and the classifier): the evaluation part
  of the held-out split recorded in the guard's provenance (:mod:`nad_guard.provenance`), which neither
  the detector nor its threshold saw: the observed false-positive rate on its correctly classified images
  at the deployed threshold, with a Clopper-Pearson interval (a warning when the whole interval lies above
  the requested rate), and, when it holds at least :data:`MIN_ERRORS` mispredictions, the detector's
  AUROC on them against the maximum softmax probability's (MSP, the simplest baseline; a warning when the
  detector is below it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

MIN_GATE_POINTS = 3          # fewer gate points than this: warned
MIN_DEPTH = 0.25             # deepest gate point before this share of the network's conv/linear layers: warned
KEPT_TOLERANCE = 0.02        # a gate point "keeps everything" at >= 1 - this for every class, "nothing" at <= this
MIN_SUBNET_ACCURACY = 0.95   # a class subnetwork below this on its correctly classified images misses its target
WEAK_AUROC = 0.7             # a training attack whose cross-validated AUROC is below this: warned
MIN_ERRORS = 10              # mispredictions needed before the detector is compared with MSP on them
CONFIDENCE = 0.95            # of the observed false-positive rate's interval


# --------------------------------------------------------------------------- the rule for masks

@dataclass(frozen=True)
class MaskProblem:
    """One way a set of masks is degenerate. ``kind``: ``keeps-all`` / ``keeps-none`` (``layer`` set,
    ``value`` the smallest / largest kept fraction over classes) or ``subnet-accuracy`` (``cls`` set,
    ``value`` the class subnetwork's accuracy on the class's correctly classified images); ``text``: what
    happened, in words."""

    kind: str
    layer: str | None
    cls: str | None
    value: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_problems(layers: Sequence[str], kept: Any, class_names: Sequence[str],
                  subnet_accuracy: Sequence[float | None] | None = None, *,
                  min_subnet_accuracy: float = MIN_SUBNET_ACCURACY, tolerance: float = KEPT_TOLERANCE
                  ) -> list[MaskProblem]:
    """The degenerate parts of a set of class masks (empty list: none).

    ``kept`` ``(L, K)``: share of gate point ``l``'s channels in class ``k``'s mask; ``subnet_accuracy``
    (per class, ``None`` where the class has no correctly classified image): share of the class's correctly
    classified images its binary-mask subnetwork still assigns to it. A gate point whose kept fraction is
    at least ``1 - tolerance`` for every class keeps everything (its masks say nothing about the classes);
    one at most ``tolerance`` for every class keeps nothing; a class subnetwork below
    ``min_subnet_accuracy`` misses its target.
    """
    kept = np.asarray(kept, dtype=np.float64).reshape(len(layers), len(class_names))
    out = []
    for name, row in zip(layers, kept):
        if row.min() >= 1 - tolerance:
            out.append(MaskProblem("keeps-all", name, None, float(row.min()), (
                f"gate point {name!r} keeps {'every channel' if row.min() == 1 else f'at least {row.min():.0%}'} "
                "for every class: its masks do not tell the classes apart")))
        elif row.max() <= tolerance:
            out.append(MaskProblem("keeps-none", name, None, float(row.max()), (
                f"gate point {name!r} keeps {'no channel' if row.max() == 0 else f'at most {row.max():.0%}'} "
                "for every class: every subnetwork is cut there")))
    for cls, acc in zip(class_names, subnet_accuracy or []):
        if acc is not None and acc < min_subnet_accuracy:
            out.append(MaskProblem("subnet-accuracy", None, str(cls), float(acc), (
                f"the subnetwork of class {cls!r} assigns only {acc:.1%} of the class's correctly classified "
                f"images to it (target {min_subnet_accuracy:.0%})")))
    return out


# --------------------------------------------------------------------------- helpers

def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a rate from ``k`` events in ``n`` trials."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def _auroc(suspicious: np.ndarray, clean: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(suspicious)), np.zeros(len(clean))]
    return float(roc_auc_score(y, np.r_[suspicious, clean]))


def depth_covered(classifier: Any, layers: Sequence[str]) -> float:
    """Share of the network's convolution and linear layers that the deepest gate point's output depends on
    (:attr:`nad_guard.paths.GateDiscovery.coverage`, the measure ``fit-paths`` warns with)."""
    from nad_guard.paths import discover_gate_points

    return discover_gate_points(classifier, layers, warn=False).coverage


def _kept_per_class(path: Path, layers: Sequence[str]) -> np.ndarray:
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "paths.safetensors"))
    return np.stack([tensors[f"masks/{n}"].astype(np.float64).mean(1) for n in layers])


# --------------------------------------------------------------------------- the report

def static_report(guard_dir: str | Path) -> dict[str, Any]:
    """The parts of the health report that ``meta.json`` and ``paths.safetensors`` hold (no classifier, no
    data): gate points, masks, subnetworks, calibration and the detector's cross-validated AUROCs, with
    ``warnings`` and ``notes`` (sentences)."""
    from nad_guard.calibration import fpr_guarantee
    from nad_guard.guard import resolve_guard_dir
    from nad_guard.paths import read_meta
    from nad_guard.provenance import exhausted_split

    path = resolve_guard_dir(guard_dir)
    meta = read_meta(path)
    warnings_: list[str] = []
    notes: list[str] = []
    layers = [str(d["name"]) for d in meta.get("layers", [])]
    channels = [int(d["channels"]) for d in meta.get("layers", [])]
    classes = [str(c) for c in meta.get("class_names", [])]
    kept = _kept_per_class(path, layers)
    metrics = meta.get("metrics") or {}
    per_class = metrics.get("classes") or []
    acc = [c.get("subnet_accuracy_on_correct") for c in per_class] if len(per_class) == len(classes) else None
    problems = mask_problems(layers, kept, classes, acc)
    if len(layers) < MIN_GATE_POINTS:
        named = ", ".join(map(repr, layers))
        warnings_.append(f"only {len(layers)} gate point{'s' if len(layers) != 1 else ''} ({named}): the "
                         f"path features see {'one layer' if len(layers) == 1 else 'few layers'} of the network; refit "
                         f"the paths with more (fit-paths --layers, at least {MIN_GATE_POINTS} spread over the depth)")
    warnings_ += [f"{p.text}; refit the paths (fit-paths: see docs/paths.md, degenerate masks)" for p in problems]
    if acc is None:
        notes.append("the artifact records no subnetwork accuracies (the paths were fitted without a test set)")
    report: dict[str, Any] = {
        "guard": str(path), "model": (meta.get("model") or {}).get("name"), "classes": len(classes),
        "gate_points": {"count": len(layers), "depth_covered": None, "layers": [
            {"name": n, "channels": c, "kept_fraction": float(k.mean()), "kept_min": float(k.min()),
             "kept_max": float(k.max())} for n, c, k in zip(layers, channels, kept)]},
        "masks": {"kept_fraction_mean": float(kept.mean()) if kept.size else None,
                  "problems": [p.to_dict() for p in problems]},
        "subnetworks": {"bound": MIN_SUBNET_ACCURACY, "per_class": dict(zip(classes, acc)) if acc else None,
                        "accuracy_on_correct_min": min((a for a in acc or [] if a is not None), default=None),
                        "other_rate_mean": metrics.get("subnet_other_rate_mean")},
    }
    det = meta.get("detector")
    if not isinstance(det, dict):
        warnings_.append("the directory holds paths but no detector: build the guard with `nad-guard fit-detector`")
        report.update(calibration=None, detector=None, warnings=warnings_, notes=notes)
        return report
    cal = det.get("calibration")
    if not isinstance(cal, dict) and det.get("calibration_clean") is not None:
        cal = fpr_guarantee(int(det["calibration_clean"]), float(det["fpr"])).to_dict()
    if isinstance(cal, dict):
        g = fpr_guarantee(int(cal["n"]), float(cal["fpr"]), **exhausted_split(det.get("provenance")))
        report["calibration"] = {k: v for k, v in g.to_dict().items() if k != "rule"} | {"summary": g.summary()}
        if g.warning:
            warnings_.append(f"small calibration set: {g.warning}")
    else:
        report["calibration"] = None
        warnings_.append("the guard records no calibration: refit the detector with `nad-guard fit-detector`")
    cv = det.get("cv_per_attack")
    report["detector"] = {"method": det.get("method"), "encoding": det.get("encoding"), "fpr": det.get("fpr"),
                          "threshold": det.get("threshold"), "suite": det.get("suite"),
                          "selection": (det.get("selection") or {}).get("selected"), "cv_per_attack": cv}
    if isinstance(meta.get("decision"), dict):  # two detectors (nad_guard.errors): the flag's rate is the sum
        err = meta.get("error_detector") or {}
        report["decision"] = {**meta["decision"], "error_detector": err.get("method"), "error_fpr": err.get("fpr")}
    deep = meta.get("deep")  # the deep check's detector (nad_guard.deep), if fitted
    report["deep"] = None if not isinstance(deep, dict) else {
        "probes": (deep.get("probes") or {}).get("k"), "spec": deep.get("probes"), "method": deep.get("method"),
        "encoding": deep.get("encoding"), "fpr": deep.get("fpr"), "threshold": deep.get("threshold"),
        "probe_columns": len(deep.get("columns") or ()), "calibration_n": (deep.get("calibration") or {}).get("n")}
    if isinstance(cv, dict) and isinstance(cv.get("auroc"), dict):
        weak = {a: v for a, v in cv["auroc"].items() if v is not None and v < WEAK_AUROC}
        for a, v in weak.items():
            warnings_.append(f"the detector's cross-validated AUROC on {a!r} is {v:.3f} (below {WEAK_AUROC}): "
                             f"it barely tells {'these errors' if a == 'mispredictions' else 'this attack'} from "
                             "clean images when not trained on it")
    elif isinstance(cv, dict) and cv.get("error"):
        notes.append(f"no per-attack cross-validated AUROC: {cv['error']}")
    elif det.get("method") in ("knn", "gaussian", "isoforest"):
        notes.append("a clean-only detector has no training attacks, so no per-attack cross-validated AUROC")
    else:
        notes.append("the guard does not record its detector's per-attack cross-validated AUROC (fitted before "
                     "nad-guard recorded it); refit the detector with `nad-guard fit-detector` to get it")
    report.update(warnings=warnings_, notes=notes)
    return report


def measure_unseen(guard: Any, data_root: str | Path | None = None, *, batch_size: int = 256,
                   images: Any | None = None) -> dict[str, Any]:
    """The guard on the images its detector never saw: the evaluation part of the held-out split its
    provenance records (``guard.meta["detector"]["provenance"]``). ``images``: that split, if already
    loaded (else it is loaded with ``data_root``). Returns ``status`` (``measured`` or why not), ``note``,
    and when measured: ``images``, ``clean`` (correctly classified), ``flagged``, ``observed_fpr``, its
    ``interval``, ``nearest_path_is_predicted`` (the share of the correct images whose nearest class
    sub-architecture is their predicted class, and chance: ``1 / classes``), and ``mispredictions`` (the detector's AUROC and MSP's on them, when enough)."""
    from nad_guard.provenance import locate

    det = guard.meta.get("detector") or {}
    record = det.get("provenance")
    if not isinstance(record, dict):
        return {"status": "unrecorded", "note": "the guard does not record which images its detector used, so none "
                "can be called never seen; refit the detector with `nad-guard fit-detector`"}
    if images is None:
        try:
            images = _load_split(record.get("data"), record.get("split", "test"), data_root, guard)
        except (ValueError, FileNotFoundError, OSError) as e:
            return {"status": "no-data", "note": f"cannot load the data set {record.get('data')!r} of the guard's "
                    f"provenance ({e}); pass its folder (--data-root)"}
    parts, info = locate(record, images)
    if info["status"] != "verified":
        return {"status": info["status"], "note": info["note"]}
    pos = np.flatnonzero(parts == "evaluation")
    x = images.subset(pos, f"{images.name}[evaluation]")
    result = guard.run(x.float(), batch_size=batch_size)
    pred = result.features.pred.numpy()
    correct = pred == x.labels.numpy()
    flags = np.asarray(result.flag, dtype=bool)
    n, k = int(correct.sum()), int(flags[correct].sum())
    lo, hi = clopper_pearson(k, n)
    out: dict[str, Any] = {"status": "measured", "split": images.name, "images": len(x), "clean": n, "flagged": k,
                           "observed_fpr": k / n if n else None, "interval": [lo, hi], "confidence": CONFIDENCE}
    same = result.features.nearest_path_class.numpy() == pred  # information only: no bound is justified yet
    out["nearest_path_is_predicted"] = {"share": float(same[correct].mean()) if n else None, "n": n,
                                        "chance": 1 / images.num_classes}
    wrong = ~correct
    msp = result.features.logits.softmax(1).max(1).values.numpy()
    if wrong.sum() >= MIN_ERRORS and n >= MIN_ERRORS:  # a two-detector guard: its error detector answers this
        s = np.asarray(result.score if result.error_score is None else result.error_score)
        out["mispredictions"] = {"n": int(wrong.sum()), "detector_auroc": _auroc(s[wrong], s[correct]),
                                 "msp_auroc": _auroc(-msp[wrong], -msp[correct])}
    else:
        out["mispredictions"] = {"n": int(wrong.sum()), "note": (
            f"only {int(wrong.sum())} mispredictions among the {len(x)} never-seen images (at least {MIN_ERRORS} are "
            "needed to compare the detector with MSP on them)")}
    return out


def _load_split(name: str | None, split: str, root: str | Path | None, guard: Any) -> Any:
    from nad_guard.data import DATASETS, load_cifar10, load_dataset

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}")
    if name == "cifar10":
        return load_cifar10(root, split)
    spec = guard.classifier.spec
    kw = {"channels": spec.channels, "size": (spec.height, spec.width)} if name == "imagefolder" else {}
    train, test = load_dataset(name, root, **kw)
    return test if split == "test" else train


def unseen_warnings(unseen: dict[str, Any], fpr: float | None, whole_split: int | None = None) -> list[str]:
    """The warnings :func:`measure_unseen`'s result calls for (``whole_split``: the guard's parts already use a
    data set's whole test split of that many images, so no larger calibration sample can be advised)."""
    out = []
    if unseen.get("status") != "measured":
        return [f"the false-positive rate on never-seen images is not measured: {unseen.get('note')}"]
    lo, hi = unseen["interval"]
    if fpr is not None and unseen["clean"] and lo > fpr:
        out.append(f"the threshold flags {unseen['flagged']} of {unseen['clean']} correctly classified images the "
                   f"detector never saw ({unseen['observed_fpr']:.1%}, {unseen['confidence']:.0%} interval "
                   f"{lo:.1%}-{hi:.1%}): clearly more than the {fpr:.0%} asked; "
                   + ("calibrate on more held-out images" if whole_split is None else
                      f"the whole test split ({whole_split:,} images) is already used: accept the higher rate, or "
                      "fit on a data set with a larger test split"))
    m = unseen.get("mispredictions") or {}
    if m.get("detector_auroc") is not None and m["detector_auroc"] < m["msp_auroc"]:
        out.append(f"on the {m['n']} never-seen mispredictions the detector's AUROC is {m['detector_auroc']:.3f}, "
                   f"below the classifier's own confidence (MSP) at {m['msp_auroc']:.3f}: for natural errors the "
                   "trust score is worse than the softmax")
    return out


def health_report(guard_dir: str | Path, *, data_root: str | Path | None = None, measure: bool = True,
                  device: str = "cpu", classifier: Any | None = None, images: Any | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole health report of a guard directory (see the module docstring): :func:`static_report`,
    plus, with ``measure``, the depth its gate points cover and :func:`measure_unseen` (the guard is loaded;
    ``classifier`` replaces the stored one for a custom classifier, ``images`` the held-out split)."""
    report = static_report(guard_dir)
    report["unseen"] = None
    if not measure or report.get("detector") is None:
        return report
    from nad_guard.guard import Guard
    from nad_guard.paths import read_meta
    from nad_guard.provenance import exhausted_split

    try:
        guard = Guard.load(report["guard"], device=device, classifier=classifier)
    except (ValueError, FileNotFoundError) as e:
        report["warnings"].append(f"the guard cannot be loaded, so nothing was measured on images: {e}")
        return report
    layers = [d["name"] for d in report["gate_points"]["layers"]]
    depth = depth_covered(guard.classifier, layers)
    report["gate_points"]["depth_covered"] = depth
    if depth < MIN_DEPTH:
        report["warnings"].append(
            f"the deepest gate point comes after only {depth:.0%} of the network's convolution and linear layers: "
            "the path features ignore the rest of the network; add deeper gate points (fit-paths --layers)")
    if log:
        log("measuring the guard on the images its detector never saw")
    report["unseen"] = measure_unseen(guard, data_root, images=images)
    rate = (report.get("decision") or report["detector"] or {}).get("fpr")  # two detectors: the combined flag's
    whole = exhausted_split((read_meta(Path(report["guard"])).get("detector") or {}).get("provenance"))
    report["warnings"] += unseen_warnings(report["unseen"], rate, whole.get("whole_split"))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text a person reads."""
    lines = [f"guard {report['guard']} (model {report['model']}, {report['classes']} classes)"]
    gp = report["gate_points"]
    depth = f", covering {gp['depth_covered']:.0%} of the depth" if gp.get("depth_covered") is not None else ""
    lines.append(f"gate points: {gp['count']}{depth}")
    for d in gp["layers"]:
        lines.append(f"  {d['name']:<24} {d['channels']:>5} channels, kept {d['kept_fraction']:.2f} "
                     f"(classes {d['kept_min']:.2f}-{d['kept_max']:.2f})")
    sub = report["subnetworks"]
    if sub["accuracy_on_correct_min"] is not None:
        weakest = min((c for c, a in sub["per_class"].items() if a is not None), key=lambda c: sub["per_class"][c])
        lines.append(f"subnetworks: the weakest (class {weakest}) assigns {sub['accuracy_on_correct_min']:.1%} of its "
                     f"class's correctly classified test images to it (target at least {sub['bound']:.0%})")
    cal = report.get("calibration")
    if cal:
        lines.append(f"calibration: {cal['n']} clean images; {cal['summary']}")
    det = report.get("detector")
    if det:
        lines.append(f"detector: {det['method']} on {det['encoding']}"
                     + (f" (chosen by cross-validation: {det['selection']})" if det.get("selection") else ""))
        dec = report.get("decision")
        if dec:
            lines.append(f"two detectors: attack detector at {det.get('fpr')}, error detector {dec.get('error_detector')} "
                         f"at {dec.get('error_fpr')}; flagged if either p-value is within its share of {dec.get('fpr')}")
        deep = report.get("deep")
        if deep:
            spec = deep.get("spec") or {}
            lines.append(f"deep mode: {deep['probes']} probes ({', '.join(spec.get('transforms', []))}; noise sigma "
                         f"{spec.get('sigma')}), {deep['method']} on {deep['encoding']} + {deep['probe_columns']} probe "
                         f"columns, calibrated on {deep['calibration_n']} clean images at {deep['fpr']}; costs about "
                         f"{deep['probes']} + 1 forward passes an image (Guard.run(deep=True), the service's "
                         f"?probes={deep['probes']})")
        cv = det.get("cv_per_attack") or {}
        if isinstance(cv.get("auroc"), dict):
            lines.append(f"  cross-validated AUROC per training attack ({cv.get('folds')} folds by "
                         f"{cv.get('folds_by')}):")
            lines += [f"    {a:<16} {v:.3f}" if v is not None else f"    {a:<16} n/a" for a, v in cv["auroc"].items()]
    u = report.get("unseen")
    if u and u.get("status") == "measured":
        lo, hi = u["interval"]
        lines.append(f"never-seen images ({u['images']} of {u['split']}, evaluation part): {u['flagged']} of "
                     f"{u['clean']} "
                     f"correctly classified flagged, FPR {u['observed_fpr']:.1%} ({u['confidence']:.0%} interval "
                     f"{lo:.1%}-{hi:.1%})")
        agree = u.get("nearest_path_is_predicted") or {}
        if agree.get("share") is not None:
            lines.append(f"  nearest class sub-architecture = the predicted class on {agree['share']:.1%} of the "
                         f"correctly classified (chance {agree['chance']:.0%})")
        m = u.get("mispredictions") or {}
        lines.append(f"  mispredictions: detector AUROC {m['detector_auroc']:.3f}, MSP {m['msp_auroc']:.3f} ({m['n']})"
                     if m.get("detector_auroc") is not None else f"  {m.get('note')}")
    elif u:
        lines.append(f"never-seen images: not measured ({u.get('note')})")
    lines += [f"note: {n}" for n in report["notes"]]
    lines += [f"WARNING: {w}" for w in report["warnings"]] or ["no warnings"]
    return "\n".join(lines)
