"""The report's numbers: :func:`summarize` turns an :class:`~nad_guard.audit.records.AuditResult`'s
per-input records into every number of the report (accuracy and confusion with Wilson intervals, NAD's
claim against chance, similarity against confusion, the per-layer divergence, the separation of errors
and attacks from correct predictions)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nad_guard.audit.claims import summarize_claims
from nad_guard.audit.split_parts import unseen
from nad_guard.audit.records import AuditResult, Samples

BOOTSTRAP_CELLS = 2_000_000  # bootstrap weights held at once (bounds the AUROC interval's memory)
MAX_TABLE_ROWS = 500  # misprediction rows shown in index.html (all are in samples.csv)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``k / n`` (95% by default); ``None`` for ``n == 0``."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _share(mask: np.ndarray) -> dict[str, Any]:
    n, k = int(mask.size), int(mask.sum())
    return {"k": k, "n": n, "share": k / n if n else None, "ci": wilson(k, n)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def _claim_group(s: Samples, k: int) -> dict[str, Any]:
    return {
        "n": len(s),
        "path_top1": _share(s.true_path_rank == 1), "path_top3": _share(s.true_path_rank <= 3),
        "classifier_second": _share(s.clf_true_rank == 2), "classifier_top3": _share(s.clf_true_rank <= 3),
        "path_is_pred": _share(s.nearest_path == s.pred),
    }


CLAIM_MEASURES = (
    ("path_top1", "path nearest to the true class's sub-architecture (rank 1)", "1/K"),
    ("path_top3", "true class's sub-architecture among the 3 nearest", "3/K"),
    ("classifier_second", "true class is the classifier's 2nd choice", "1/(K-1)"),
    ("classifier_top3", "true class in the classifier's top 3", "2/(K-1)"),
    ("path_is_pred", "path nearest to the predicted class's sub-architecture", "1/K"),
)


def _chance(rule: str, k: int) -> float:
    return {"1/K": 1 / k, "3/K": min(3, k) / k, "1/(K-1)": 1 / max(k - 1, 1),
            "2/(K-1)": min(2, k - 1) / max(k - 1, 1)}[rule]


def _spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    import warnings

    from scipy.stats import spearmanr

    out: dict[str, Any] = {"n_pairs": int(len(x)), "n_pairs_confused": int((y > 0).sum()), "rho": None,
                           "p_value": None}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "undefined: too few pairs, or one of the two is constant"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(x, y)
    out["rho"], out["p_value"] = float(r.statistic), float(r.pvalue)
    return out


def pair_rates(conf: np.ndarray) -> np.ndarray:
    """Row-normalised off-diagonal rates, symmetrised: ``(R[i, j] + R[j, i]) / 2`` ``(K, K)``."""
    rows = conf.sum(1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=np.float64), where=rows > 0)
    np.fill_diagonal(rate, 0.0)
    return (rate + rate.T) / 2


def _separation_row(what: str, neg: np.ndarray, pos: np.ndarray, neg_flag: np.ndarray | None,
                    pos_flag: np.ndarray | None, seed: int) -> dict[str, Any]:
    from nad_guard.metrics import auroc, bootstrap_ci, labels_and_scores

    row: dict[str, Any] = {"what": what, "n_correct": int(len(neg)), "n_positive": int(len(pos)),
                           "auroc": None, "auroc_ci": None, "caught": None, "caught_ci": None,
                           "false_alarms": None}
    if len(neg) and len(pos):
        y, s = labels_and_scores(neg, pos)
        row["auroc"] = auroc(y, s)
        row["auroc_ci"] = bootstrap_ci(y, s, "auroc", n_resamples=1000, seed=seed, max_cells=BOOTSTRAP_CELLS)
    if pos_flag is not None and len(pos):
        row.update({"caught": float(pos_flag.mean()), "caught_ci": wilson(int(pos_flag.sum()), len(pos))})
    if neg_flag is not None and len(neg):
        row["false_alarms"] = float(neg_flag.mean())
    return row


def summarize(result: AuditResult) -> dict[str, Any]:
    """Every number of the report (JSON-ready), from the per-sample records."""
    c, names, k = result.clean, result.class_names, len(result.class_names)
    seed = int(result.config.get("seed", 0))
    correct = c.correct
    mis = c.select(~correct)
    conf = confusion_matrix(c.label, c.pred, k)
    out: dict[str, Any] = {
        "n_images": len(c), "classes": names, "layers": result.layers, "threshold": result.threshold,
        "accuracy": {**_share(correct), "per_class": [
            {"class": names[j], **_share(correct[c.label == j])} for j in range(k)]},
        "confusion": conf,
        "flagged": {"correct": _share(c.flag[correct]), "mispredicted": _share(c.flag[~correct])},
        "calibration": result.calibration,
    }

    # NAD's claim: where does the path of an error lead?
    groups = {"mispredictions": mis}
    groups.update({f"adversarial: {a}": s for a, s in result.adversarial.items()})
    groups["correct predictions (reference)"] = c.select(correct)
    out["nad_claim"] = {
        "K": k, "groups": {g: _claim_group(s, k) for g, s in groups.items()},
        "chance": {m: _chance(rule, k) for m, _, rule in CLAIM_MEASURES},
        "chance_rule": {m: rule for m, _, rule in CLAIM_MEASURES},
        "measures": {m: label for m, label, _ in CLAIM_MEASURES},
    }

    # Similar sub-architectures vs confused classes
    sim = result.similarity
    iu = np.triu_indices(k, 1)
    pair_rate = pair_rates(conf)
    svc: dict[str, Any] = {"similarity": sim, "errors": _spearman(sim[iu], pair_rate[iu])}
    order = np.argsort(-pair_rate[iu], kind="stable")
    svc["most_confused_pairs"] = [
        {"classes": [names[iu[0][i]], names[iu[1][i]]], "confusion_rate": float(pair_rate[iu][i]),
         "similarity": float(sim[iu][i]),
         "similarity_rank": int(1 + (sim[iu] > sim[iu][i]).sum())}
        for i in order[:10] if pair_rate[iu][i] > 0]
    if result.adversarial:
        adv = [s for s in result.adversarial.values() if len(s)]
        if adv:
            adv_conf = sum(confusion_matrix(s.label, s.pred, k) for s in adv)
            svc["adversarial_confusion"] = adv_conf
            svc["adversarial"] = _spearman(sim[iu], pair_rates(adv_conf)[iu])
    out["similarity_vs_confusion"] = svc

    # Layer by layer
    lgroups = {"correct": c.select(correct), "mispredicted": mis}
    lgroups.update({f"adversarial: {a}": s for a, s in result.adversarial.items()})
    layers: dict[str, Any] = {}
    for g, s in lgroups.items():
        n = len(s)
        d = s.divergence
        mean = d.mean(0) if n else np.full(len(result.layers), np.nan)
        half = 1.959964 * d.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(len(result.layers), np.nan)
        layers[g] = {"n": n, "divergence_mean": mean, "divergence_ci_half": half,
                     "nearest_is_true": (s.layer_nearest == s.label[:, None]).mean(0) if n else mean,
                     "nearest_is_pred": (s.layer_nearest == s.pred[:, None]).mean(0) if n else mean}
    out["layers_by_group"] = layers

    # Separation of errors (and attacks) from correct predictions
    status = result.split.get("status")
    if status == "verified":
        basis = "evaluation"
        in_basis = unseen(c.part)
        basis_note = ("measured only on the images the detector was neither fitted nor calibrated on (the "
                      f"evaluation part of its holdout split, and any image outside its sample): {int(in_basis.sum())}")
    elif status == "independent":
        basis, in_basis = "all", np.ones(len(c), dtype=bool)
        basis_note = "measured on all audited images: the detector was fitted and calibrated on another split"
    else:
        basis, in_basis = "all", np.ones(len(c), dtype=bool)
        basis_note = ("measured on all audited images, some of which the detector may have been fitted or "
                      "calibrated on (its holdout split could not be determined): optimistic")
    cb, mb = correct & in_basis, ~correct & in_basis
    rows = [_separation_row("mispredictions vs correct: suspicion score", c.score[cb], c.score[mb],
                            c.flag[cb], c.flag[mb], seed),
            _separation_row("mispredictions vs correct: classifier confidence (1 - max softmax; reference)",
                            1 - c.confidence[cb], 1 - c.confidence[mb], None, None, seed)]
    for a, s in result.adversarial.items():
        sb = unseen(s.part) if basis == "evaluation" else np.ones(len(s), dtype=bool)
        rows.append(_separation_row(f"adversarial ({a}) vs correct: suspicion score", c.score[cb], s.score[sb],
                                    c.flag[cb], s.flag[sb], seed))
    if c.error_trust is not None:  # two detectors: each p-value on its own question (1 - p: higher = more suspicious)
        rows.append(_separation_row("mispredictions vs correct: error detector (1 - error p-value)",
                                    1 - c.error_trust[cb], 1 - c.error_trust[mb], None, None, seed))
        for a, s in result.adversarial.items():
            if s.attack_trust is None:  # no adversarial of this attack
                continue
            sb = unseen(s.part) if basis == "evaluation" else np.ones(len(s), dtype=bool)
            rows.append(_separation_row(f"adversarial ({a}) vs correct: attack detector (1 - attack p-value)",
                                        1 - c.attack_trust[cb], 1 - s.attack_trust[sb], None, None, seed))
        cfg = result.config
        out["two_detectors"] = {
            "attack_fpr": cfg.get("attack_fpr"), "error_fpr": cfg.get("error_fpr"),
            "error_detector_method": cfg.get("error_detector_method"),
            "correct_flagged_by_attack": float((c.attack_trust[cb] <= cfg["attack_fpr"]).mean()) if cb.any() else None,
            "correct_flagged_by_error": float((c.error_trust[cb] <= cfg["error_fpr"]).mean()) if cb.any() else None,
            "mispredictions_flagged_by_error": (float((c.error_trust[mb] <= cfg["error_fpr"]).mean())
                                                if mb.any() else None)}
    if basis == "evaluation":
        rows.append(_separation_row("mispredictions vs correct, all audited images (includes the images the "
                                    "detector was fitted and calibrated on: optimistic)", c.score[correct],
                                    c.score[~correct], c.flag[correct], c.flag[~correct], seed))
    out["separation"] = {"basis": basis, "note": basis_note, "threshold": result.threshold,
                         "fpr_target": result.config.get("fpr"), "rows": rows}
    out["n_mispredictions"] = int((~correct).sum())
    out["mispredictions"] = _misprediction_rows(c, names, MAX_TABLE_ROWS)
    out["gallery"] = [{"index": g.position, "split_part": g.part, "true": g.label, "true_name": names[g.label],
                       "pred": g.pred, "pred_name": names[g.pred], "confidence": g.confidence,
                       "trust_score": g.trust, "suspicion_score": g.score, "flagged": g.flag,
                       "nearest_path_class": g.nearest_path, "nearest_path_class_name": names[g.nearest_path],
                       "true_class_path_rank": g.true_path_rank} for g in result.gallery]
    out["split"] = result.split
    out["attacks"] = result.attack_stats
    out["claims"] = summarize_claims(result, _spearman, pair_rates, conf)
    return out


def _misprediction_rows(c: Samples, names: list[str], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` least trusted mispredictions, least trusted first (all are in samples.csv)."""
    idx = np.flatnonzero(~c.correct)
    idx = idx[np.lexsort((c.position[idx], -c.score[idx], c.trust[idx]))][:limit]
    return [{"index": int(c.position[i]), "split_part": str(c.part[i]), "true": int(c.label[i]),
             "true_name": names[c.label[i]], "pred": int(c.pred[i]), "pred_name": names[c.pred[i]],
             "confidence": float(c.confidence[i]), "trust_score": float(c.trust[i]),
             "suspicion_score": float(c.score[i]), "flagged": bool(c.flag[i]),
             "nearest_path_class": int(c.nearest_path[i]), "nearest_path_class_name": names[c.nearest_path[i]],
             "true_class_path_rank": int(c.true_path_rank[i]), "classifier_true_rank": int(c.clf_true_rank[i])}
            for i in idx]
