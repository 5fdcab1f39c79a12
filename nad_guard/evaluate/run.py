"""The entry point: :func:`run_evaluation` runs the configured protocols on one classifier and its path
model and gathers everything into one JSON-ready result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from nad_guard.calibration import fpr_guarantee as calibration_guarantee
from nad_guard.data import ImageSet
from nad_guard.evaluate.adaptive import adaptive_protocol
from nad_guard.evaluate.config import PROTOCOLS, SELECT, EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.deployed import deployed_protocol
from nad_guard.evaluate.protocols import (FittedBaselines, clean_only_protocol, mispredictions_protocol,
                                          supervised_protocol)
from nad_guard.evaluate.report import summarize
from nad_guard.paths import PathModel
from nad_guard.provenance import compare as compare_provenance
from nad_guard.provenance import summary as provenance_summary
from nad_guard.runinfo import machine_info


def run_evaluation(paths: PathModel, train: ImageSet, test: ImageSet, cfg: EvalConfig | None = None, *,
                   cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                   guard_provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the protocols of ``cfg`` (see :mod:`nad_guard.evaluate`) and return a JSON-ready result dict with
    ``rows`` (one per protocol, detector and attack), ``summary`` (mean AUROC per detector and protocol),
    ``attacks`` (per split: success rate, mean perturbation, time), ``adaptive``, ``config``, ``machine``,
    ``provenance`` (which images each part holds, by content hash; with ``guard_provenance``, the record of
    the artifact's guard, whether they are its detector's parts: :func:`nad_guard.provenance.compare`)
    and ``seconds``. ``scores`` (kept for the ROC plots) is not JSON and is dropped by :func:`write_outputs`."""
    cfg = cfg or EvalConfig()
    log = log or (lambda _m: None)
    unknown = set(cfg.protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if cfg.select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {cfg.select!r}")
    if cfg.select == "cv" and cfg.cv_folds < 2:
        raise ValueError(f"cv_folds must be at least 2, got {cfg.cv_folds}")
    cfg.clean_specs()
    t_start = time.time()
    machine_start = machine_info()
    d = EvalData(paths, train, test, cfg, Path(cache_dir) if cache_dir is not None else None, log)
    t0 = time.time()
    b = FittedBaselines(d, cfg.seed)
    log(f"baselines fitted in {time.time() - t0:.0f} s")
    rows: list[dict[str, Any]] = []
    deployed = None
    scores: dict[str, Any] = {}
    timings: dict[str, float] = {"attacks": round(d.attack_seconds, 1), "features": round(d.feature_seconds, 1)}
    if d.column_seconds:  # multi-pass columns: part of "features"; "single_pass_features" is the rest
        timings |= {("probe_columns" if n == "probes" else f"columns:{n}"): round(v, 1)
                    for n, v in d.column_seconds.items()}
        timings["single_pass_features"] = round(d.feature_seconds - sum(d.column_seconds.values()), 1)
    atk = d.usable
    for protocol in cfg.protocols:
        t0 = time.time()
        keep: dict[str, Any] = {}
        if protocol == "seen":
            part = supervised_protocol(d, b, cfg, [(a, [a]) for a in atk], "seen", keep)
        elif protocol == "unseen":
            part = supervised_protocol(d, b, cfg, [(a, [o for o in atk if o != a]) for a in atk if len(atk) > 1],
                                       "unseen", keep)
        elif protocol == "fgsm-only":
            part = (supervised_protocol(d, b, cfg, [(a, ["fgsm"]) for a in atk if a != "fgsm"], "fgsm-only", keep)
                    if "fgsm" in atk else [])
        elif protocol == "clean-only":
            part = clean_only_protocol(d, b, cfg, keep)
        elif protocol == "mispredictions":
            part = mispredictions_protocol(d, b, cfg, keep)
        elif protocol == "deployed":
            part, deployed = deployed_protocol(d, b, cfg, keep)
        else:
            continue
        rows += [{"protocol": protocol, **r} for r in part]
        scores[protocol] = keep
        timings[protocol] = round(time.time() - t0, 1)
        log(f"{protocol}: {len(part)} rows in {timings[protocol]:.0f} s")
    adaptive = None
    if "adaptive" in cfg.protocols and "pgd" in d.suite.names:
        t0 = time.time()
        adaptive = adaptive_protocol(d, b, cfg, log)
        timings["adaptive"] = round(time.time() - t0, 1)
    attacks = {split: {a: {**r.stats.to_dict(), "from_cache": r.from_cache} for a, r in res.items()}
               for split, res in d.adv.items()}
    paths.classifier.cpu()
    return {
        "config": cfg.to_dict(), "model": paths.classifier.name,
        "data": {"test": test.name, "test_images": len(test) if cfg.max_images is None else min(cfg.max_images, len(test)),
                 **{f"{k}_images": len(v) for k, v in d.splits.items()},
                 **{f"{k}_clean": len(v) for k, v in d.clean.items()},
                 "evaluation_mispredicted": d.n_wrong["evaluation"], "fit_mispredicted": d.n_wrong["fit"],
                 **({"negatives": {p: len(d.features[k]) for p, k in d.negatives.items()}} if d.noisy else {}),
                 "baseline_train_images": len(d.train_labels), "baseline_layers": d.layers,
                 "gate_points": paths.layer_names_},
        "attacks": attacks, "rows": rows, "summary": summarize(rows), "deployed": deployed, "adaptive": adaptive,
        "calibration": calibration_guarantee(len(d.clean["calibration"]), cfg.fpr).to_dict(),
        "provenance": {**provenance_summary(d.provenance),
                       **({"guard": compare_provenance(d.provenance, guard_provenance)}
                          if guard_provenance is not None else {})},
        "machine": {"start": machine_start, "end": machine_info()}, "timings": timings,
        "seconds": round(time.time() - t_start, 1), "scores": scores,
    }
