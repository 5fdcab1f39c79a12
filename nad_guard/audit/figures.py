"""The report's PNG figures (matplotlib, Agg canvas, no pyplot): confusion and similarity heatmaps,
similarity against confusion, NAD's claim, the per-layer curves, ROC, score histograms, the gallery."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nad_guard.audit.split_parts import unseen
from nad_guard.audit.records import AuditResult
from nad_guard.audit.stats import CLAIM_MEASURES, pair_rates


def _figure(w: float, h: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)  # Agg canvas, no pyplot: no global backend state
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _short(name: str, n: int = 10) -> str:
    return name if len(name) <= n else name[:n - 1] + "."


def write_figures(result: AuditResult, out: Path, dpi: int) -> dict[str, Path]:
    """Write every figure of the report into ``out``; returns their paths by name (no gallery when it is empty)."""
    s = result.summary
    figs = {
        "confusion_similarity": _fig_confusion_similarity(result, out / "confusion_similarity.png", dpi),
        "similarity_vs_confusion": _fig_similarity_scatter(result, out / "similarity_vs_confusion.png", dpi),
        "nad_claim": _fig_claim(s, out / "nad_claim.png", dpi),
        "layers": _fig_layers(result, out / "layers.png", dpi),
        "roc": _fig_roc(result, out / "roc.png", dpi),
        "scores": _fig_scores(result, out / "scores.png", dpi),
    }
    claims = s.get("claims") or {}
    if any(t["by_k"] for d in claims.get("sources", {}).values() for t in d["nad_test"].values()):
        figs["nad_test"] = _fig_nad_test(claims, out / "nad_test.png", dpi)
    if (claims.get("subnetwork_explanations") or {}).get("n_images"):
        figs["deletion"] = _fig_deletion(claims["subnetwork_explanations"], out / "deletion.png", dpi)
    if result.gallery:
        figs["gallery"] = _fig_gallery(result, out / "gallery.png", dpi)
    return figs


def _fig_nad_test(claims: dict[str, Any], path: Path, dpi: int) -> Path:
    """NAD's test: per source, group and k, the share of hits with its interval, and chance."""
    bars = [(f"{src}: {g}", t) for src, d in claims["sources"].items() for g, t in d["nad_test"].items() if t["n"]]
    ks = [str(k) for k in claims["ks"]]
    fig = _figure(6.5, 3.6, dpi)
    ax = fig.add_subplot()
    width = 0.8 / max(len(bars), 1)
    for bi, (label, t) in enumerate(bars):
        vals, lo, hi = [], [], []
        for k in ks:
            v = t["by_k"].get(k)
            share = v["share"] if v and v["share"] is not None else np.nan
            vals.append(share)
            lo.append(max(0.0, share - v["ci"][0]) if v and v["ci"] else 0)
            hi.append(max(0.0, v["ci"][1] - share) if v and v["ci"] else 0)
        x = np.arange(len(ks)) - 0.4 + width * (bi + 0.5)
        ax.bar(x, vals, width, yerr=[lo, hi], capsize=2, label=f"{label} (n={t['n']})", color=f"C{(3 + bi) % 10}",
               alpha=0.85)
    first = bars[0][1]["by_k"] if bars else {}
    for i, k in enumerate(ks):
        if k in first:
            ax.hlines(first[k]["chance"], i - 0.42, i + 0.42, colors="k", linestyles=":", linewidth=1.2,
                      label="chance k/(K-1)" if i == 0 else None)
    ax.set_xticks(range(len(ks)), [f"predicted class among the true\nclass's {k} most similar" for k in ks], fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="share of errors (95% Wilson interval)",
           title="NAD's test: similar sub-architectures")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _fig_deletion(sal: dict[str, Any], path: Path, dpi: int) -> Path:
    """Mean deletion curves of the subnetwork's and the full model's saliency and of a random order, for the
    black and the blurred baseline."""
    panels = [("removed pixels set to 0", sal)]
    if sal.get("blurred_baseline"):
        panels.append((f"removed pixels blurred (sigma {sal['blurred_baseline']['sigma']:g} px)",
                       sal["blurred_baseline"]))
    fig = _figure(4.8 * len(panels), 3.8, dpi)
    styles = {"subnetwork": ("C3", "-"), "full": ("C0", "-"), "random": ("C7", "--")}
    for i, (label, d) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for o, curve in d["mean_curve"].items():
            color, ls = styles.get(o, ("k", "-"))
            ax.plot(sal["fractions"], curve, color=color, linestyle=ls, marker="o", markersize=3,
                    label=f"{o} (mean AUC {d['mean_auc'][o]:.3f})")
        ax.set(xlabel="fraction of pixels removed (saliency order)", ylabel="full model's probability of the class",
               ylim=(0, 1.02), title=f"deletion, {label}\n{sal['n_images']} correct images (lower = better)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _heatmap(fig, ax, m: np.ndarray, names: list[str], title: str, cmap: str, annotate: np.ndarray | None = None):
    k = len(names)
    im = ax.imshow(m, cmap=cmap, vmin=0, vmax=max(float(np.nanmax(m)) if np.isfinite(m).any() else 1.0, 1e-9))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    if k <= 20:
        ax.set_xticks(range(k), [_short(n, 6) for n in names], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [_short(n, 8) for n in names], fontsize=7)
    if annotate is not None and k <= 12:
        top = float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
        for i in range(k):
            for j in range(k):
                if annotate[i, j]:
                    dark = np.isfinite(m[i, j]) and m[i, j] > 0.6 * top
                    ax.text(j, i, str(int(annotate[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")


def _fig_confusion_similarity(result: AuditResult, path: Path, dpi: int) -> Path:
    names = result.class_names
    conf = np.asarray(result.summary["confusion"], dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    off = rate.copy()
    np.fill_diagonal(off, np.nan)
    sim = result.similarity.copy().astype(np.float64)
    np.fill_diagonal(sim, np.nan)
    cnt = conf.copy()
    np.fill_diagonal(cnt, 0)
    fig = _figure(10, 4.4, dpi)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _heatmap(fig, ax1, off, names, "confusion rate, row-normalised (diagonal left out;\nnumbers: counts)",
             "Reds", cnt)
    ax1.set(xlabel="predicted class", ylabel="true class")
    _heatmap(fig, ax2, sim, names, "sub-architecture similarity\n(mean Jaccard of masks; diagonal left out)", "Blues")
    ax2.set(xlabel="class", ylabel="class")
    return _save(fig, path)


def _fig_similarity_scatter(result: AuditResult, path: Path, dpi: int) -> Path:
    svc = result.summary["similarity_vs_confusion"]
    names, k = result.class_names, len(result.class_names)
    iu = np.triu_indices(k, 1)
    sim = result.similarity[iu]
    series = [("natural errors", pair_rates(np.asarray(result.summary["confusion"]))[iu], svc["errors"], "C3")]
    if "adversarial_confusion" in svc:  # its own panel: adversarial rates are on another scale
        series.append(("adversarial examples (source -> adversarial prediction)",
                       pair_rates(np.asarray(svc["adversarial_confusion"]))[iu], svc["adversarial"], "C0"))
    fig = _figure(5.0 * len(series), 4.2, dpi)
    for n, (label, rate, stat, color) in enumerate(series):
        ax = fig.add_subplot(1, len(series), n + 1)
        rho = f"Spearman {stat['rho']:.2f}, p = {stat['p_value']:.2g}" if stat["rho"] is not None else "undefined"
        ax.scatter(sim, rate, s=14, alpha=0.7, color=color)
        for i in np.argsort(-rate, kind="stable")[:5]:
            if rate[i] > 0:
                ax.annotate(f"{_short(names[iu[0][i]], 6)}-{_short(names[iu[1][i]], 6)}", (sim[i], rate[i]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("sub-architecture similarity of the pair")
        ax.set_ylabel("symmetrised confusion rate of the pair")
        ax.set_title(f"{label}\n{len(sim)} class pairs; {rho}", fontsize=8)
    return _save(fig, path)


def _fig_claim(s: dict[str, Any], path: Path, dpi: int) -> Path:
    claim = s["nad_claim"]
    groups = [g for g in claim["groups"] if not g.startswith("correct")]
    measures = [m for m, _, _ in CLAIM_MEASURES[:4]]
    labels = ["path: true class\nnearest", "path: true class\nin top 3", "classifier:\ntrue is 2nd",
              "classifier:\ntrue in top 3"]
    fig = _figure(7.5, 3.8, dpi)
    ax = fig.add_subplot()
    width = 0.8 / max(len(groups), 1)
    for gi, g in enumerate(groups):
        vals, lo, hi = [], [], []
        for m in measures:
            d = claim["groups"][g][m]
            v = d["share"] if d["share"] is not None else np.nan
            vals.append(v)
            lo.append(max(0.0, v - d["ci"][0]) if d["ci"] else 0)  # max: a share at an interval's end,
            hi.append(max(0.0, d["ci"][1] - v) if d["ci"] else 0)  # rounded, is not a negative error bar
        x = np.arange(len(measures)) - 0.4 + width * (gi + 0.5)
        ax.bar(x, vals, width, yerr=[lo, hi], capsize=2, label=f"{g} (n={claim['groups'][g]['n']})",
               color=f"C{(3 if gi == 0 else gi - 1) % 10}", alpha=0.85)
    for i, m in enumerate(measures):
        ax.hlines(claim["chance"][m], i - 0.42, i + 0.42, colors="k", linestyles=":", linewidth=1.2,
                  label="chance" if i == 0 else None)
    ax.set_xticks(range(len(measures)), labels, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="share (95% Wilson interval)", title="Where do the errors' paths lead?")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _fig_layers(result: AuditResult, path: Path, dpi: int) -> Path:
    lg = result.summary["layers_by_group"]
    names = result.layers
    x = np.arange(len(names))
    fig = _figure(10, 3.9, dpi)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (g, d) in enumerate(lg.items()):
        if not d["n"]:
            continue
        color = {"correct": "C2", "mispredicted": "C3"}.get(g, f"C{(i - 2) % 10 if i > 1 else 0}")
        mean, half = np.asarray(d["divergence_mean"], float), np.asarray(d["divergence_ci_half"], float)
        ax1.plot(x, mean, marker="o", color=color, label=f"{g} (n={d['n']})")
        if np.isfinite(half).all():
            ax1.fill_between(x, mean - half, mean + half, color=color, alpha=0.15)
        ax2.plot(x, d["nearest_is_true"], marker="o", color=color, label=g)
    rot = 45 if len(names) > 5 else 0
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=rot, fontsize=7, ha="right" if rot else "center")
        ax.set_xlabel("gate point (input -> output)")
    ax1.set(ylabel="mean divergence (1 - mass share)", title="activation outside the predicted class's\n"
            "sub-architecture (band: 95% CI of the mean)")
    ax2.set(ylabel="share", ylim=(-0.02, 1.02), title="share of inputs whose nearest sub-architecture\n"
            "at this gate point is the true class")
    ax1.legend(fontsize=7)
    return _save(fig, path)


def _fig_roc(result: AuditResult, path: Path, dpi: int) -> Path:
    from nad_guard.metrics import labels_and_scores, roc_curve

    sep = result.summary["separation"]
    c = result.clean
    basis = unseen(c.part) if sep["basis"] == "evaluation" else np.ones(len(c), dtype=bool)
    cb, mb = c.correct & basis, ~c.correct & basis
    fig = _figure(5.2, 4.8, dpi)
    ax = fig.add_subplot()
    curves = [("mispredictions: suspicion score", c.score[cb], c.score[mb], c.flag[cb], c.flag[mb], "C3", "-"),
              ("mispredictions: 1 - confidence", 1 - c.confidence[cb], 1 - c.confidence[mb], None, None, "C7", "--")]
    for i, (a, s) in enumerate(result.adversarial.items()):
        sb = unseen(s.part) if sep["basis"] == "evaluation" else np.ones(len(s), dtype=bool)
        curves.append((f"adversarial {a}: suspicion score", c.score[cb], s.score[sb], c.flag[cb], s.flag[sb],
                       f"C{i}", "-"))
    plotted = 0
    for (label, neg, pos, nf, pf, color, ls), row in zip(curves, sep["rows"]):
        if not len(neg) or not len(pos):
            continue
        plotted += 1
        f, t, _ = roc_curve(*labels_and_scores(neg, pos))
        ax.plot(f, t, color=color, linestyle=ls, label=f"{label} (AUROC {row['auroc']:.3f}, n+={len(pos)})")
        if nf is not None:
            ax.plot([nf.mean()], [pf.mean()], marker="o", color=color, markersize=5)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false alarm rate (correct predictions flagged)", ylabel="share of errors flagged",
           xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC ({'evaluation part' if sep['basis'] == 'evaluation' else 'all images'}); "
                 "dots: calibrated threshold")
    if plotted:
        ax.legend(loc="lower right", fontsize=6)
    else:
        ax.text(0.5, 0.5, "nothing to separate:\nno errors or no correct predictions", ha="center", va="center")
    return _save(fig, path)


def _fig_scores(result: AuditResult, path: Path, dpi: int) -> Path:
    c = result.clean
    groups = [("correct", c.score[c.correct], "C2"), ("mispredicted", c.score[~c.correct], "C3")]
    for i, (a, s) in enumerate(result.adversarial.items()):
        groups.append((f"adversarial {a}", s.score, f"C{i}"))
    allv = np.concatenate([g[1] for g in groups if len(g[1])])
    lo, hi = float(min(allv.min(), result.threshold)), float(max(allv.max(), result.threshold))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    fig = _figure(6, 3.6, dpi)
    ax = fig.add_subplot()
    for label, v, color in groups:
        if len(v):
            ax.hist(v, bins=bins, histtype="step", density=True, color=color, linewidth=1.4,
                    label=f"{label} (n={len(v)})")
    ax.axvline(result.threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {result.threshold:.3g}")
    ax.set_yscale("log")
    ax.set(xlabel="suspicion score (higher = more suspicious)", ylabel="density (log)",
           title="suspicion scores of all audited inputs")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _fig_gallery(result: AuditResult, path: Path, dpi: int) -> Path:
    items, names = result.gallery, result.class_names
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig = _figure(1.5 * cols, 1.9 * rows, dpi)
    for i, g in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = g.image
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.transpose(img[:3], (1, 2, 0)))
        ax.set_xticks([])
        ax.set_yticks([])
        color = "C3" if g.label != g.pred else "k"
        ax.set_title(f"#{g.position} {_short(names[g.label], 7)}->{_short(names[g.pred], 7)}\n"
                     f"trust {g.trust:.3f} path {_short(names[g.nearest_path], 7)}", fontsize=7, color=color)
    return _save(fig, path)
