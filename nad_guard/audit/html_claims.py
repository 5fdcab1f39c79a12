"""The report's sections on the seeds' interpretability claims (:mod:`nad_guard.audit.claims`): each
misprediction's path layer by layer and its deciding filters, NAD's k-most-similar test, and the
subnetwork-explanation deletion test. Each is a function of ``(result, summary, figures)`` returning HTML
parts, like the sections of :mod:`nad_guard.audit.html`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nad_guard.audit.claims import explanation_rows
from nad_guard.audit.html_parts import ci, e, f, img, table
from nad_guard.audit.records import AuditResult

MAX_SHOWN = 100  # mispredictions whose path table the page shows (all are in explanations.json)
SCALE = 1.0      # |s_pred - s_true| (standard deviations) at which a cell's colour is full


def _cell(row: dict[str, Any], layer_name: str, l: int, names: list[str]) -> str:
    """Gate point ``l`` of one misprediction: ``s_pred - s_true``, red where the predicted class's
    sub-architecture matches the path better, blue where the true class's does."""
    layer = {key: v[l] for key, v in row["layers"].items()}
    layer["layer"] = layer_name
    d = layer["score_pred"] - layer["score_true"]
    a = min(abs(d) / SCALE, 1.0) * 0.75
    colour = f"rgba(200,40,40,{a:.2f})" if d > 0 else f"rgba(40,90,200,{a:.2f})"
    tip = (f"{layer['layer']}: score true {layer['score_true']:.2f}, predicted {layer['score_pred']:.2f}; mass in "
           f"true mask {layer['mass_true']:.2f}, predicted mask {layer['mass_pred']:.2f}; nearest "
           f"{names[layer['nearest']]}")
    return (f'<span class="cell" style="background:{colour}" title="{e(tip)}">{d:+.2f}<br>'
            f'<small>{layer["mass_true"]:.2f}/{layer["mass_pred"]:.2f}</small></span>')


def _channels(r: dict[str, Any]) -> str:
    tags = []
    for ch in r["channels"]:
        where = "P" if ch["in_pred"] else ""
        where += "T" if ch["in_true"] else ""
        tags.append(f'<span class="ch">c{ch["channel"]} {ch["contribution"]:+.2f}'
                    + (f"<sup>{where}</sup>" if where else "") + "</span>")
    return " ".join(tags)


def explanations_section(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """Each misprediction's path against the true and predicted class's sub-architectures, and the filters
    that decided it (:mod:`nad_guard.audit.explain`)."""
    names = result.class_names
    ex = s["claims"].get("explanations")
    parts = ["<h2>Each misprediction's path, layer by layer: where did it leave the true class, and which "
             "filters decided it?</h2>"]
    if ex is None:
        return parts + ["<p>Not computed (run without <code>explain</code>).</p>"]
    if not ex["n"]:
        return parts + ["<p>No mispredictions.</p>"]
    n = ex["n"]
    where = ", ".join(f"{e(layer)}: {c}" for layer, c in ex["divergence_layer_counts"].items())
    parts.append(
        f"<p>At every gate point, the per-layer scores of the true class's (<i>s<sub>t</sub></i>) and the predicted "
        f"class's (<i>s<sub>p</sub></i>) sub-architecture for the input's path (standard deviations, as in the "
        f"divergence features). The path <i>diverges</i> at the first gate point from which "
        f"<i>s<sub>p</sub> &gt; s<sub>t</sub></i> holds to the output. Of the {n} mispredictions, the path diverges at "
        f"{where}; for {ex['never_diverged']} the true class's sub-architecture still matches better at the last gate "
        "point (the error is made after it).</p>")
    parts.append(
        f"<p><b>Deciding filters</b>: at the divergence layer (the last gate point when there is none), the "
        f"{ex['top']} channels with the largest contribution (gradient × activation, summed over positions) to the "
        f"margin logit<sub>p</sub> − logit<sub>t</sub>. {f(ex['deciding_in_pred_mask'], '.0%')} of them lie in the "
        f"predicted class's mask and {f(ex['deciding_in_true_mask'], '.0%')} in the true class's (the masks hold "
        f"{f(ex['pred_mask_share'], '.0%')} and {f(ex['true_mask_share'], '.0%')} of those layers' channels). "
        f"<b>Knock-out check</b>: zeroing those {ex['top']} channels changes the prediction of "
        f"<b>{ex['knockout_flips']} of {n}</b> mispredictions ({ex['knockout_to_true']} to the true class); "
        f"zeroing {ex['top']} random channels of the same layer changes {ex['random_knockout_flips']} "
        f"({ex['random_knockout_to_true']} to the true class).</p>")
    rows = explanation_rows(result)[:MAX_SHOWN]
    cut = (f"the {len(rows)} least trusted are shown; all are in <code>{e(ex['rows_file'])}</code>"
           if len(rows) < n else "least trusted first")
    parts.append(f'<p class="note">One row per misprediction ({cut}). Each gate point\'s cell: '
                 '<i>s<sub>p</sub> − s<sub>t</sub></i> (red: the predicted class\'s sub-architecture matches better, '
                 'blue: the true class\'s), below it the share of the pooled activation inside the true / predicted '
                 'class\'s mask; hover a cell for both scores and the nearest class. Filters: channel, contribution '
                 'to the margin, <sup>P</sup>/<sup>T</sup> = in the predicted / true class\'s mask.</p>')
    layers = result.layers
    body = ([str(r["index"]), f'<span class="ch">{e(names[r["true"]])} → {e(names[r["pred"]])}</span>',
             *[_cell(r, name, l, names) for l, name in enumerate(layers)], e(r["divergence_layer"] or "none"),
             f'<span class="filters">{_channels(r)}</span>',
             (f'<span class="ch">→ {e(names[r["knockout"]["pred_after"]])}</span>' if r["knockout"]["flips"]
              else "no change")]
            for r in rows)
    parts.append('<div class="scroll paths">' + table(["index", "true → predicted", *layers, "diverges at",
                                                 "deciding filters (at that layer)", "knock-out"], body, left=2)
                 + "</div>")
    return parts


def nad_test_section(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """NAD's own test: is the wrongly predicted class among the true class's k most similar sub-architectures?"""
    c = s["claims"]
    k = len(result.class_names)
    parts = ["<h2>Is the wrong class among the true class's most similar sub-architectures? (NAD's own test)</h2>",
             f"<p>NAD claims that an input is misclassified into a class whose sub-architecture is similar to the "
             f"correct class's. For each misprediction the other {k - 1} classes are ranked by the similarity of their "
             f"class path to the true class's (ties broken at random, seeded); a hit: the predicted class is among the "
             f"k most similar. Chance is k/(K−1) (the predicted class drawn uniformly from the other classes); "
             f"p-values: one-sided binomial test against it; intervals: 95% Wilson. For adversarial examples, the "
             f"source class against the adversarial prediction.</p>",
             "<p>Class paths: " + "; ".join(f"<b>{e(src)}</b>: {e(d['description'])}"
                                           for src, d in c["sources"].items()) + ".</p>"]
    rows = []
    for src, d in c["sources"].items():
        for g, t in d["nad_test"].items():
            for kk, v in t["by_k"].items():
                rows.append([e(src), e(f"{g} (n={t['n']})"), kk, f"{v['hits']} of {v['n']}",
                             f"<b>{f(v['share'])}</b> {ci(v['ci'])}", f(v["chance"]), f(v["lift"], ".2f"),
                             f(v["p_value"], ".2g")])
    parts.append(table(["class paths", "group", "k", "hits", "share [95% CI]", "chance", "lift", "p (binomial)"],
                       rows, left=2))
    parts.append(img(figs, "nad_test", "NAD's k-most-similar test against chance"))
    for src, d in c["sources"].items():
        t = d["nad_test"]["mispredictions"]
        if not t["n"] or not t["by_k"]:
            continue
        ks = list(t["by_k"])
        per = [[e(t["by_k"][ks[0]]["per_class"][j]["class"]), str(t["by_k"][ks[0]]["per_class"][j]["n"]),
                *[(f"{f(t['by_k'][kk]['per_class'][j]['share'])} {ci(t['by_k'][kk]['per_class'][j]['ci'])}"
                   if t["by_k"][kk]["per_class"][j]["n"] else "·") for kk in ks]] for j in range(k)]
        parts.append(f'<p class="note">Per true class ({e(src)}; {t["ties"]} of {t["n"]} ranks depended on a '
                     "tie):</p>")
        parts.append('<div class="scroll">' + table(["true class", "mispredictions",
                                                     *[f"share, k = {kk} (chance {f(t['by_k'][kk]['chance'])})"
                                                       for kk in ks]], per) + "</div>")
        svc = d["similarity_vs_confusion"]
        if svc["rho"] is not None:
            parts.append(f'<p class="note">{e(src)}: Spearman ρ of pair similarity against confusion rate '
                         f"{f(svc['rho'])} (p = {f(svc['p_value'], '.2g')}, {svc['n_pairs']} pairs).</p>")
    return parts


def saliency_section(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    """The subnetwork-explanation claim (Wang, Su & Hu 2019), by the deletion metric."""
    sal = s["claims"].get("subnetwork_explanations")
    parts = ["<h2>Do explanations through the predicted class's subnetwork point at the pixels the classifier "
             "needs? (the subnetwork-explanation claim)</h2>"]
    if sal is None:
        return parts + ["<p>Not computed (<code>saliency_images</code> = 0).</p>"]
    if not sal["n_images"]:
        return parts + ["<p>No correctly classified images to explain.</p>"]
    cmp, m = sal["subnetwork_minus_full"], sal["mean_auc"]
    parts.append(
        f"<p>Class-specific subnetworks (Wang, Su &amp; Hu 2019) are said to give more accurate explanations than "
        f"the full model. On {sal['n_images']} correctly classified images (seeded sample): the gradient saliency of "
        f"the predicted class's logit (max |gradient| over colour channels) through the predicted class's "
        f"subnetwork (its masks applied at every gate point) and through the full model; pixels are removed "
        f"(set to 0) in saliency order in {sal['steps']} equal steps and the <b>full</b> model's probability of the "
        f"predicted class is read after each; the deletion AUC is the area under that curve over the removed "
        f"fraction (lower = the saliency found the pixels the classifier needs). A random order is the reference. "
        f"Interval: paired bootstrap over images (95%); test: Wilcoxon signed-rank.</p>")
    blur = sal.get("blurred_baseline")
    parts.append(f"<p><b>Verdict: {e(sal['verdict'])}.</b> Mean deletion AUC: subnetwork {f(m['subnetwork'])}, full "
                 f"model {f(m['full'])}, random order {f(m['random'])}; subnetwork − full "
                 f"{f(cmp['mean_difference'], '+.3f')} {ci(cmp['ci'])} (median "
                 f"{f(cmp['median_difference'], '+.3f')}; lower for {f(cmp['share_lower'], '.0%')} of the images; "
                 f"Wilcoxon p = {f(cmp['wilcoxon_p'], '.2g')}).</p>")
    if blur:
        b = blur["subnetwork_minus_full"]
        parts.append(f"<p>With removed pixels replaced by a blurred copy of the image (Gaussian, sigma "
                     f"{f(blur['sigma'], 'g')} pixels) instead of black: <b>{e(blur['verdict'])}</b>; mean AUC "
                     f"subnetwork {f(blur['mean_auc']['subnetwork'])}, full {f(blur['mean_auc']['full'])}, random "
                     f"{f(blur['mean_auc']['random'])}; subnetwork − full {f(b['mean_difference'], '+.3f')} "
                     f"{ci(b['ci'])}.</p>")
    beaten = [name for name, d in (("black", sal), ("blurred", blur)) if d
              and (d["full_minus_random"]["mean_difference"] or 0) > 0]
    if beaten:
        parts.append(f'<p class="bad">With the {" and the ".join(beaten)} baseline a random pixel order scores lower '
                     "(better) than the full model's saliency: there the metric reacts to how pixels are removed more "
                     "than to which, so its verdict on the two saliencies says little.</p>")
    pairs = [(f"{name} ({base})", d[key]) for base, d in (("black", sal), ("blurred", blur)) if d
             for name, key in (("subnetwork − full model", "subnetwork_minus_full"),
                               ("full model − random order", "full_minus_random"),
                               ("subnetwork − random order", "subnetwork_minus_random"))]
    rows = [[e(name), f(c["mean_difference"], "+.3f"), ci(c["ci"]), f(c["share_lower"], ".0%"),
             f(c["wilcoxon_p"], ".2g")] for name, c in pairs]
    parts.append(table(["paired difference of deletion AUC (baseline)", "mean", "95% CI", "share < 0",
                        "Wilcoxon p"], rows))
    parts.append(img(figs, "deletion", "mean deletion curves"))
    return parts
