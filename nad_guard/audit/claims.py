"""The seeds' interpretability claims, measured in the audit on any guard (issue 20, items 4 and 5):
the pass that needs the images again (:func:`claims_pass`: each misprediction's path and deciding filters,
:mod:`~nad_guard.audit.explain`; the subnetwork-explanation deletion test, :mod:`~nad_guard.audit.saliency`)
and the numbers of the report (:func:`summarize_claims`: NAD's k-most-similar test per class-path source,
:mod:`~nad_guard.audit.class_paths`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from nad_guard.audit.class_paths import KS, class_path_sources, k_similar_test, similar_ranks
from nad_guard.audit.explain import explain_mispredictions
from nad_guard.audit.records import AuditResult, Samples
from nad_guard.audit.saliency import SALIENCY_IMAGES, subnetwork_explanations
from nad_guard.data import ImageSet

EXPLANATIONS_FILE = "explanations.json"  # every misprediction's path and deciding filters, one compact file


def _images(data: ImageSet, positions: np.ndarray) -> torch.Tensor:
    return data.images[torch.as_tensor(positions, dtype=torch.long)].float().div_(255.0)


def claims_pass(guard: Any, data: ImageSet, clean: Samples, *, saliency_images: int = SALIENCY_IMAGES,
                explain: bool = True, seed: int = 0, encoder: Any = None, batch_size: int = 256,
                log: Any = None) -> dict[str, Any]:
    """The parts of the claims that run the classifier again: ``explanations`` (every misprediction of
    ``clean``, :func:`explain_mispredictions`; ``None`` with ``explain=False``), ``saliency`` (a seeded
    sample of ``saliency_images`` correctly classified images, :func:`subnetwork_explanations`; ``None``
    for 0) and ``class_paths`` (:func:`class_path_sources`: with an NND ``encoder``, its class averages over
    the correctly classified images of ``clean``), with their ``timings``."""
    log = log or (lambda msg: None)
    paths = guard.paths
    out: dict[str, Any] = {"explanations": None, "saliency": None, "timings": {}}
    t0 = time.perf_counter()
    ok = clean.position[clean.correct]
    idx = torch.as_tensor(ok, dtype=torch.long)
    out["class_paths"] = class_path_sources(guard, encoder, data.images[idx] if encoder is not None else None,
                                            clean.label[clean.correct], batch_size)
    if encoder is not None:
        out["timings"]["encoder_class_paths_s"] = round(time.perf_counter() - t0, 3)
        log(f"encoder class paths from {len(ok)} correctly classified images in "
            f"{out['timings']['encoder_class_paths_s']:.1f} s")
    if explain:
        t0 = time.perf_counter()
        wrong = np.flatnonzero(~clean.correct)
        pos = clean.position[wrong]
        out["explanations"] = explain_mispredictions(paths, _images(data, pos), torch.as_tensor(clean.label[wrong]),
                                                     pos, seed=seed)
        out["timings"]["explain_s"] = round(time.perf_counter() - t0, 3)
        log(f"paths of {len(pos)} mispredictions explained in {out['timings']['explain_s']:.1f} s")
    if saliency_images > 0:
        t0 = time.perf_counter()
        ok = np.flatnonzero(clean.correct)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(ok, min(saliency_images, len(ok)), replace=False)) if len(ok) else ok
        pos = clean.position[pick]
        out["saliency"] = subnetwork_explanations(paths, _images(data, pos), torch.as_tensor(clean.label[pick]), pos,
                                                  seed=seed)
        out["timings"]["saliency_s"] = round(time.perf_counter() - t0, 3)
        log(f"saliency deletion test on {len(pos)} images in {out['timings']['saliency_s']:.1f} s")
    return out


def summarize_claims(result: AuditResult, spearman: Any, pair_rates: Any, confusion: np.ndarray) -> dict[str, Any]:
    """The report's ``claims`` entry: per class-path source, NAD's test on the mispredictions (and on each
    attack's adversarial examples) and the similarity-against-confusion correlation; the misprediction
    explanations' aggregate and first rows; the subnetwork-explanation test. ``spearman`` and ``pair_rates``
    are :mod:`~nad_guard.audit.stats`' functions (passed in: that module imports this one)."""
    k, names = len(result.class_names), result.class_names
    seed = int(result.config.get("seed", 0))
    iu = np.triu_indices(k, 1)
    rate = pair_rates(confusion)[iu]
    sources = {}
    for src in result.class_paths:
        sim = src.similarity()
        groups = {"mispredictions": k_similar_test(sim, result.clean.label, result.clean.pred, names, KS, seed)}
        for a, s in result.adversarial.items():
            groups[f"adversarial: {a}"] = k_similar_test(sim, s.label, s.pred, names, KS, seed)
        sources[src.name] = {"description": src.description, "layers": list(src.layers), "similarity": sim,
                             "nad_test": groups, "similarity_vs_confusion": spearman(sim[iu], rate),
                             **({"images_per_class": src.images_per_class} if src.images_per_class else {})}
    out: dict[str, Any] = {"ks": list(KS), "sources": sources}
    ex = result.explanations
    if ex is not None:  # the rows go to explanations.json (report.write_report): thousands of them
        out["explanations"] = {**{key: v for key, v in ex.items() if key != "rows"}, "rows_file": EXPLANATIONS_FILE}
    if result.saliency is not None:
        out["subnetwork_explanations"] = result.saliency
    return out


def explanation_rows(result: AuditResult) -> list[dict[str, Any]]:
    """Every misprediction's explanation (:func:`explain_mispredictions`), least trusted first (the order of
    the report's misprediction table); empty when none were computed."""
    if result.explanations is None:
        return []
    c = result.clean
    at = {int(p): i for i, p in enumerate(c.position)}

    def order(r: dict[str, Any]) -> tuple[float, float, int]:
        i = at[r["index"]]
        return float(c.trust[i]), -float(c.score[i]), int(r["index"])
    return sorted(result.explanations["rows"], key=order)


def csv_columns(result: AuditResult) -> list[str]:
    """The per-input columns the claims add to samples.csv: per source, the rank of the predicted class among
    the true class's most similar classes (empty for correct predictions)."""
    return [f"similar_rank:{src.name}" for src in result.class_paths]


def csv_values(result: AuditResult, s: Samples) -> list[list[str]]:
    """Per source, the column of :func:`csv_columns` for every row of ``s`` (strings; '' where correct)."""
    seed = int(result.config.get("seed", 0))
    cols = []
    for src in result.class_paths:
        r = similar_ranks(src.similarity(), s.label, s.pred, seed)
        cols.append(["" if v == 0 else str(int(v)) for v in r])
    return cols
