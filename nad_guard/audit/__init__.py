"""Offline audit of a guard on a labelled data set: a report a person reads.

:func:`run_audit` streams a data split through :meth:`Guard.run <nad_guard.guard.Guard.run>` in
batches and keeps, per input, only scalars (label, prediction, confidence, trust, suspicion score,
flag, nearest sub-architecture, ranks) and the per-layer divergence ``(L,)``, plus the images of
the ``gallery_size`` least trusted inputs: memory is ``O(N * L)`` numbers, time linear in ``N``.
:func:`write_report` turns the :class:`AuditResult` into a self-contained folder: ``index.html``
(no external assets, no JavaScript), ``summary.json``, ``samples.csv`` and PNG figures.

Definitions (one each, shared with the service):

``nearest_path_class``
    :attr:`PathFeatures.nearest_path_class <nad_guard.paths.PathFeatures.nearest_path_class>`: the
    argmax over classes of :attr:`~nad_guard.paths.PathFeatures.path_similarity` (the mean over gate
    points of the per-layer class score ``s_k`` of :mod:`nad_guard.paths`: how well class ``k``'s
    sub-architecture matches the input's path).
``true_class_path_rank``
    :meth:`PathFeatures.true_class_rank <nad_guard.paths.PathFeatures.true_class_rank>`: rank
    ``1..K`` of the true class's sub-architecture by path similarity (1 = nearest; ties count in
    the true class's favour).
``classifier_true_rank``
    ``1 + #{k : logit_k > logit_true}``: where the classifier itself ranks the true class (1 =
    predicted; ties in the true class's favour).
divergence at a gate point
    ``1 - mass_share``: the share of the layer's pooled activation outside the predicted class's
    sub-architecture (0 = entirely inside), as the service reports it.
``suspicion_score`` / ``trust_score`` / ``flagged``
    :class:`~nad_guard.guard.GuardResult`'s ``score`` (higher = more suspicious), ``trust``
    (conformal p-value in (0, 1], higher = more trustworthy) and ``flag`` (score above the
    threshold calibrated at the guard's false-positive rate).

Honest separation figures: a guard's detector is fitted on the *detector-fit* part (40%) of its data
set's test split and its threshold on the *calibration* part (20%, see
:func:`nad_guard.holdout.holdout_splits`). When the audited split is that split, every image is
assigned its part from the provenance the guard's meta.json records (positions in the split, checked
by content hash: :mod:`nad_guard.provenance`; no recomputed score is used to tell images apart), and
ROC, AUROC and the caught share are measured on the *evaluation* part only (the images the detector
never saw). When the guard records no provenance, or the audited split's content is not the recorded
one, the report says so (and how to fix it) and measures on all images. The report also gives what
the clean calibration set guarantees about the false-positive rate (:mod:`nad_guard.calibration`).
Attacks (optional) are made only on correctly classified images of the evaluation part (all images
when the audited data is not the detector's), through :func:`nad_guard.attacks.generate`
and its on-disk cache; only successful ones are kept.

The seeds' interpretability claims are measured on every audit (issue 20): NAD's own test (is the wrongly
predicted class among the true class's k most similar sub-architectures, k = 1, 3, against chance
k/(K-1): :mod:`~nad_guard.audit.class_paths`, per class-path source), each misprediction's path layer by
layer against the true and predicted class's sub-architectures with the filters that decided it and a
knock-out check (:mod:`~nad_guard.audit.explain`), and the subnetwork-explanation claim by a deletion
metric (:mod:`~nad_guard.audit.saliency`); :mod:`~nad_guard.audit.claims` runs and summarises them.

The package, one idea a file: :mod:`~nad_guard.audit.inputs` (the guard directory, the data split,
whether they fit), :mod:`~nad_guard.audit.split_parts` (the detector's holdout parts),
:mod:`~nad_guard.audit.records` (what is kept per input), :mod:`~nad_guard.audit.run` (the passes and
:func:`run_audit`), :mod:`~nad_guard.audit.stats` (the report's numbers), :mod:`~nad_guard.audit.class_paths`,
:mod:`~nad_guard.audit.explain`, :mod:`~nad_guard.audit.saliency` and :mod:`~nad_guard.audit.claims` (the
claims), :mod:`~nad_guard.audit.figures` (the PNG figures), :mod:`~nad_guard.audit.html`,
:mod:`~nad_guard.audit.html_claims` and :mod:`~nad_guard.audit.html_parts` (the page) and
:mod:`~nad_guard.audit.report` (the folder: :func:`write_report`). Everything other code uses is
importable from ``nad_guard.audit``.
"""

from __future__ import annotations

# The public API. Settings such as ATTACK_CHUNK or GALLERY_SIZE live in the file that uses them
# (nad_guard.audit.run, .stats, ...); re-exported copies here would not change what the audit does.
from nad_guard.audit.class_paths import (ClassPaths, class_path_sources, class_paths_from_encoder,
                                        class_paths_from_masks, k_similar_test)
from nad_guard.audit.explain import explain_mispredictions
from nad_guard.audit.inputs import AuditError, check_fits, guard_data, load_audit_encoder, load_split
from nad_guard.audit.records import AuditResult, GalleryItem, Samples
from nad_guard.audit.report import write_report, write_samples_csv
from nad_guard.audit.run import calibration_record, run_audit
from nad_guard.audit.saliency import deletion_auc, deletion_curves, subnetwork_explanations
from nad_guard.audit.split_parts import holdout_parts
from nad_guard.audit.stats import confusion_matrix, summarize, wilson

__all__ = ["AuditError", "AuditResult", "ClassPaths", "GalleryItem", "Samples", "check_fits", "class_path_sources",
           "class_paths_from_encoder", "class_paths_from_masks", "confusion_matrix", "deletion_auc", "deletion_curves",
           "explain_mispredictions", "guard_data", "calibration_record", "holdout_parts", "k_similar_test",
           "load_audit_encoder", "load_split", "run_audit", "subnetwork_explanations", "summarize", "wilson",
           "write_report", "write_samples_csv"]
