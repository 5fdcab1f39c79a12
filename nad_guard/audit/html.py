"""The report's page: :func:`render_html` writes ``index.html`` (no external assets, no JavaScript), one
section function per question the page answers, from the :class:`~nad_guard.audit.records.AuditResult`
and the summary that ``summary.json`` holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nad_guard.audit.html_claims import explanations_section, nad_test_section, saliency_section
from nad_guard.audit.html_parts import ci as _ci, e as _e, f as _f, img as _img, table as _table
from nad_guard.audit.records import AuditResult
from nad_guard.audit.stats import CLAIM_MEASURES
from nad_guard.provenance import PART_INDEPENDENT, PART_UNKNOWN

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.note { color: #555; font-size: 0.92em; } .bad { color: #b00; } code { background: #f5f5f5; padding: 0 3px; }
.kv td:first-child { text-align: left; font-weight: bold; } .scroll { max-height: 520px; overflow: auto; }
.cell { display: inline-block; min-width: 3em; padding: 1px 3px; border-radius: 3px; line-height: 1.15; }
.cell small { color: #333; font-size: 0.8em; } .filters { display: inline-block; min-width: 16em; font-size: 0.85em; }
.ch { white-space: nowrap; } .paths table { font-size: 0.76em; } .paths td, .paths th { padding: 2px 4px; }
.paths .filters { min-width: 15em; }
thead th { position: sticky; top: 0; z-index: 1; }
"""


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def _thresholds(threshold: float, cfg: dict[str, Any]) -> str:
    """The deployed threshold and the rates of the guard's detectors, as its metadata records them (a
    two-detector guard's threshold is its attack detector's, at that detector's share of the rate)."""
    if cfg.get("attack_fpr") is not None and cfg.get("error_fpr") is not None:
        return (f"attack detector's threshold {_f(threshold, '.4g')} at {_rate(cfg['attack_fpr'])} FPR; error "
                f"detector's at {_rate(cfg['error_fpr'])}; flagged at {_rate(cfg['fpr'])} in all")
    return f"threshold {_f(threshold, '.4g')} at {_rate(cfg['fpr'])} false positives"


def _intro(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """The title, what was audited with which guard, the command and the machine."""
    k, cfg = len(result.class_names), s["config"]
    acc = s["accuracy"]
    mis_n = acc["n"] - acc["k"]
    parts: list[str] = []
    add = parts.append
    add(f"<h1>Audit of mispredictions: {_e(cfg['model'])} on {_e(cfg['data'])}</h1>")
    sample = f" (a seeded stratified sample of {cfg['split_images']})" if acc["n"] < cfg["split_images"] else ""
    add(f"<p>{acc['n']} images audited{sample}"
        f"; {mis_n} mispredicted. Guard: <code>{_e(cfg['guard'] or 'in memory')}</code> "
        f"(detector <code>{_e(cfg['detector_method'])}</code>, encoding <code>{_e(cfg['encoding'])}</code>, "
        f"{_e(_thresholds(result.threshold, cfg))}). {len(result.layers)} gate points, {k} classes.</p>")
    two = s.get("two_detectors")
    if two:
        add(f"<p>Two detectors, two p-values per input (<code>attack_p_value</code>, <code>error_p_value</code> in "
            f"samples.csv): an attack detector at {_f(two['attack_fpr'], '.2%')} and an error detector "
            f"(<code>{_e(two['error_detector_method'])}</code>) at {_f(two['error_fpr'], '.2%')}; an input is flagged "
            f"when either p-value is within its share. On the correct images of the separation section, "
            f"{_f(two['correct_flagged_by_attack'], '.1%')} are flagged by the attack detector and "
            f"{_f(two['correct_flagged_by_error'], '.1%')} by the error detector; the error detector flags "
            f"{_f(two['mispredictions_flagged_by_error'], '.1%')} of the mispredictions.</p>")
    add(f"<p class=\"note\">Command: <code>{_e(s['command'])}</code><br>Run time: "
        f"{_f(s['timings'].get('total_s', s['timings'].get('audit_s')), '.1f')} s; "
        f"machine: {_e(s['machine'].get('cpu'))}, "
        f"{_e(s['machine'].get('cores'))} cores, device {_e(cfg['device'])}. Definitions of every quantity are at the "
        "end of the page.</p>")
    return parts


def _accuracy(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 1: accuracy and the confusion matrix."""
    names, k = result.class_names, len(result.class_names)
    acc = s["accuracy"]
    parts: list[str] = []
    add = parts.append
    # 1. accuracy and confusion
    add("<h2>How accurate is the classifier, and which classes does it confuse?</h2>")
    add(f"<p>Accuracy <b>{_f(acc['share'], '.4f')}</b> ({acc['k']} of {acc['n']}; 95% Wilson interval "
        f"{_ci(acc['ci'], '.4f')}).</p>")
    add(_img(figs, "confusion_similarity", "confusion matrix and sub-architecture similarity"))
    if k <= 20:
        conf = np.asarray(s["confusion"])
        add("<p class=\"note\">Confusion matrix (rows: true class, columns: predicted class, counts):</p>")
        add(_table(["true \\ predicted", *names, "accuracy"],
                   ([_e(names[i]),
                     *[(f"<b>{v}</b>" if i == j else (str(v) if v else "·")) for j, v in enumerate(conf[i])],
                     _f(acc["per_class"][i]["share"])] for i in range(k))))
    return parts


def _mispredictions(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 2: each misprediction, least trusted first."""
    k = len(result.class_names)
    parts: list[str] = []
    add = parts.append
    # 2. each misprediction
    add("<h2>Each misprediction: what was predicted, how far was it trusted, where did its path go?</h2>")
    shown = s["mispredictions"]
    if not shown:
        add("<p>No mispredictions.</p>")
    else:
        n_all = s["n_mispredictions"]
        cut = f"; the first {len(shown)} are shown, all are in <code>samples.csv</code>" if len(shown) < n_all else ""
        add(f"<p>{n_all} mispredictions, least trusted first{cut}. "
            "<i>Path rank of true class</i>: where the true class's sub-architecture ranks among all "
            f"{k} by path similarity (1 = nearest).</p>")
        add('<div class="scroll">' + _table(
            ["index", "part", "true", "predicted", "confidence", "trust", "flagged", "nearest path",
             "path rank of true class", "classifier rank of true class"],
            ([str(r["index"]), _e(r["split_part"]), _e(r["true_name"]), _e(r["pred_name"]), _f(r["confidence"]),
              _f(r["trust_score"]), "yes" if r["flagged"] else '<span class="bad">no</span>',
              _e(r["nearest_path_class_name"]), str(r["true_class_path_rank"]), str(r["classifier_true_rank"])]
             for r in shown), left=4) + "</div>")
    return parts


def _nad_claim(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 3: NAD's claim, measured against chance and the classifier's own ranking."""
    k = len(result.class_names)
    parts: list[str] = []
    add = parts.append
    # 3. NAD claim
    claim = s["nad_claim"]
    add("<h2>Does an error's path lead to its true class's sub-architecture? (NAD's claim, measured)</h2>")
    add(f"<p>Neural Architecture Disentanglement suggests that a misclassified input still flows through "
        f"(or near) its true class's sub-architecture. For each error group: the share whose path is nearest to the "
        f"true class's sub-architecture, or has it among the 3 nearest, next to chance (1/K = {_f(1 / k)}, "
        f"3/K = {_f(min(3, k) / k)}) and next to the classifier's own ranking of the true class (for an error, the "
        f"true class can only be the classifier's 2nd or later choice: chance 1/(K-1) for 2nd, 2/(K-1) for top 3). "
        "Intervals: 95% Wilson.</p>")
    gnames = list(claim["groups"])
    add(_table(["measure", "chance", *[f"{g} (n={claim['groups'][g]['n']})" for g in gnames]],
               ([_e(label), f"{_f(claim['chance'][m])} ({claim['chance_rule'][m]})",
                 *[(f"<b>{_f(claim['groups'][g][m]['share'])}</b> {_ci(claim['groups'][g][m]['ci'])}"
                    if claim["groups"][g][m]["n"] else "n/a") for g in gnames]]
                for m, label, _ in CLAIM_MEASURES)))
    add(_img(figs, "nad_claim", "NAD claim shares with intervals"))
    return parts


def _similarity_vs_confusion(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 4: sub-architecture similarity against confusion over class pairs."""
    k = len(result.class_names)
    parts: list[str] = []
    add = parts.append
    # 4. similarity vs confusion
    svc = s["similarity_vs_confusion"]
    add("<h2>Are classes with similar sub-architectures the ones the model confuses?</h2>")

    def rho_txt(st: dict[str, Any]) -> str:
        if st["rho"] is None:
            return f"undefined ({_e(st.get('note', ''))})"
        return (f"Spearman ρ = <b>{_f(st['rho'])}</b> (p = {_f(st['p_value'], '.2g')}) over {st['n_pairs']} "
                "class pairs, "
                f"{st['n_pairs_confused']} of them confused at least once")
    add(f"<p>Each class pair's sub-architecture similarity (mean Jaccard index of the two classes' masks over the "
        f"gate points) against how often the model confuses the pair (row-normalised confusion rate, averaged over "
        f"both directions). Natural errors: {rho_txt(svc['errors'])}."
        + (f" Adversarial examples (source class → adversarial prediction): {rho_txt(svc['adversarial'])}."
           if "adversarial" in svc else "") + "</p>")
    others = {n: d for n, d in s.get("claims", {}).get("sources", {}).items() if n != "masks"}
    if others:
        add("<p>The same against natural errors with the other class paths of NAD's test above (weighted Jaccard "
            "index of their class vectors): " + "; ".join(f"{_e(n)}: {rho_txt(d['similarity_vs_confusion'])}"
                                                           for n, d in others.items()) + ".</p>")
    add(_img(figs, "similarity_vs_confusion", "similarity against confusion rate per class pair"))
    if svc["most_confused_pairs"]:
        add(_table(["most confused pairs", "confusion rate", "similarity", f"similarity rank (of {k * (k - 1) // 2})"],
                   ([_e(" / ".join(p["classes"])), _f(p["confusion_rate"]), _f(p["similarity"]),
                     str(p["similarity_rank"])] for p in svc["most_confused_pairs"])))
    return parts


def _layers(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 5: the per-layer divergence and nearest sub-architecture, input to output."""
    parts: list[str] = []
    add = parts.append
    # 5. layers
    add("<h2>Where does the flow go wrong? Layer by layer, from input to output</h2>")
    add("<p>Left: the mean per-layer <i>divergence</i>, the share of the layer's pooled activation that lies outside "
        "the predicted class's sub-architecture (0 = entirely inside). Right: the share of inputs whose nearest "
        "sub-architecture at that gate point (by the per-layer class score) is the true class: where it drops for "
        "errors, the path has left the true class.</p>")
    add(_img(figs, "layers", "per-layer divergence curves"))
    lg = s["layers_by_group"]
    add(_table(["group", "n", *[f"{_e(l)}" for l in result.layers]],
               ([_e(g), str(d["n"]), *[f"{_f(m)} ± {_f(h)}<br><span class=\"note\">true nearest {_f(t, '.2f')}</span>"
                                       for m, h, t in zip(d["divergence_mean"], d["divergence_ci_half"],
                                                          d["nearest_is_true"])]]
                for g, d in lg.items()), left=1))
    return parts


def _separation(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 6: how well the suspicion score separates errors (and attacks) from correct predictions,
    and what the calibration guarantees."""
    cfg = s["config"]
    parts: list[str] = []
    add = parts.append
    # 6. separation
    sep = s["separation"]
    add("<h2>How well does the trust score separate errors from correct predictions?</h2>")
    learned = s["split"].get("detector_fit_mispredicted")
    add(f"<p><b>Basis:</b> {_e(sep['note'])}.<br><b>Which images the detector saw:</b> {_e(s['split']['note'])}."
        + (f" The detector was trained on the {learned} mispredictions of its fit part as well (as suspicious "
           "inputs), so errors of that part are not a fair test of it." if learned else "") + "</p>")
    flagged = ("either detector's score above its threshold" if cfg.get("error_fpr") is not None else
               "suspicion score above it")
    add(f"<p>AUROC: the probability that an error gets a higher suspicion score than a correct prediction (0.5 = no "
        f"better than chance; 95% stratified bootstrap interval). <i>Caught</i>: the share of errors flagged at the "
        f"calibrated threshold ({_e(_thresholds(result.threshold, cfg))}, calibrated on the clean calibration images; "
        f"flagged = {flagged}); <i>false alarms</i>: the share of correct predictions flagged. The ROC uses the "
        "suspicion score (the trust score is a step function of it). The classifier's own confidence is shown for "
        "reference.</p>")
    cal = s.get("calibration") or {}
    if cal:
        add(f"<p><b>Calibration</b> (split conformal; <code>nad_guard.calibration</code>): {_e(cal['summary'])}, "
            "for clean inputs drawn like the calibration images.</p>")
        if cal.get("warning"):
            add(f'<p class="bad"><b>Warning:</b> {_e(cal["warning"])}.</p>')
    add(_table(["what", "positives", "correct", "AUROC", "AUROC 95% CI", "caught", "caught 95% CI", "false alarms"],
               ([_e(r["what"]), str(r["n_positive"]), str(r["n_correct"]), _f(r["auroc"]), _ci(r["auroc_ci"]),
                 _f(r["caught"]), _ci(r["caught_ci"]), _f(r["false_alarms"])] for r in sep["rows"])))
    add(_img(figs, "roc", "ROC curves"))
    add(_img(figs, "scores", "suspicion score histograms"))
    return parts


def _gallery(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 7: the least trusted inputs."""
    parts: list[str] = []
    add = parts.append
    # 7. gallery
    add("<h2>Which inputs does the guard trust least?</h2>")
    if s["gallery"]:
        add(f"<p>The {len(s['gallery'])} least trusted audited images (lowest trust, then highest suspicion score); "
            "titles: index, true → predicted class (red: mispredicted), trust score, nearest path class.</p>")
        add(_img(figs, "gallery", "least trusted inputs"))
        add('<div class="scroll">' + _table(
            ["index", "part", "true", "predicted", "confidence", "trust", "suspicion", "flagged", "nearest path",
             "path rank of true class"],
            ([str(g["index"]), _e(g["split_part"]), _e(g["true_name"]), _e(g["pred_name"]), _f(g["confidence"]),
              _f(g["trust_score"]), _f(g["suspicion_score"]), "yes" if g["flagged"] else "no",
              _e(g["nearest_path_class_name"]), str(g["true_class_path_rank"])] for g in s["gallery"]), left=4)
            + "</div>")
    else:
        add("<p>No gallery (gallery size 0).</p>")
    return parts


def _how_made(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Section 8: attacks, settings, timings, machine, definitions and the folder's files."""
    cfg = s["config"]
    parts: list[str] = []
    add = parts.append
    # 8. how it was made
    add("<h2>How this report was made</h2>")
    if s["attacks"]:
        add("<p>Attacks (made only on correctly classified images; only successful ones kept):</p>")
        add(_table(["attack", "attacked", "kept", "success rate", "mean L-inf", "mean L2", "seconds", "from cache"],
                   ([_e(a), str(v["attacked"]), str(v["kept"]), _f(v["success_rate"]), _f(v["mean_linf"]),
                     _f(v["mean_l2"]), _f(v["generation_seconds"], ".1f"), str(v["from_cache"])]
                    for a, v in s["attacks"].items())))
    split = s["split"]
    add(_table(["setting", "value"], ([_e(key), _e(v)] for key, v in
                                      [*cfg.items(), ("detector split status", split.get("status")),
                                       ("detector fit set", split.get("detector_fit_set")),
                                       ("detector calibration set", split.get("detector_calibration_set"))]), left=2))
    add(_table(["timing", "seconds"], ([_e(key), _e(v)] for key, v in s["timings"].items())))
    add(_table(["machine", "value"], ([_e(key), _e(v)] for key, v in s["machine"].items()), left=2))
    add("<h3>Definitions</h3><ul class=\"note\">"
        "<li><b>sub-architecture</b> of class k: its binary channel mask at every gate point (learned by NAD).</li>"
        "<li><b>path similarity</b> (N × K): the mean over gate points of the per-layer score of class k's "
        "sub-architecture for the input's path (<code>nad_guard.paths.path_similarity</code>; higher = nearer); "
        "<b>nearest path class</b> = its argmax (lowest index on ties); "
        "<b>path rank of the true class</b> = 1 + the number of classes with a strictly higher similarity.</li>"
        "<li><b>classifier rank of the true class</b> = 1 + the number of classes with a strictly higher logit.</li>"
        "<li><b>divergence</b> at a gate point = 1 − mass share: the share of pooled activation outside the "
        "predicted class's mask.</li>"
        "<li><b>suspicion score</b>: the detector's score, higher = more suspicious; <b>trust</b>: its conformal "
        "p-value among the clean calibration scores, in (0, 1], higher = more trustworthy; <b>flagged</b>: score "
        "above the calibrated threshold.</li>"
        "<li><b>split part</b>: detector-fit / calibration / evaluation part of the detector's holdout split, "
        f"{PART_INDEPENDENT} (another split), or {PART_UNKNOWN}.</li></ul>")
    add("<p class=\"note\">Files: <code>summary.json</code> (every number here), <code>samples.csv</code> (one row "
        "per audited input, with per-layer divergence), "
        + ("<code>explanations.json</code> (every misprediction's path and deciding filters), "
           if s.get("claims", {}).get("explanations") else "")
        + ", ".join(f"<code>{_e(f.name)}</code>" for f in figs.values())
        + ".</p>")
    return parts


SECTIONS = (_intro, _accuracy, _mispredictions, explanations_section, _nad_claim, nad_test_section,
            _similarity_vs_confusion, _layers, saliency_section, _separation, _gallery, _how_made)


def render_html(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> str:
    """The whole ``index.html`` page: every section of :data:`SECTIONS` in order, with :data:`CSS` inline."""
    cfg = s["config"]
    parts = [p for section in SECTIONS for p in section(result, s, figs)]
    n = 0
    for i, p in enumerate(parts):  # sections are numbered in page order
        if p.startswith("<h2>"):
            n += 1
            parts[i] = f"<h2>{n}. " + p[len("<h2>"):]
    title = f"nad-guard audit: {cfg['model']} on {cfg['data']}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
