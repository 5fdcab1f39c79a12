"""Detectors that read more than the predicting pass: the columns each needs from the images of every
set of a run, computed while :class:`~nad_guard.evaluate.data.EvalData` streams the images once
(:func:`image_columns`), and kept in :attr:`FeatureSet.extra <nad_guard.evaluate.features.FeatureSet>`.

Each entry is ``name -> fn(x)``: ``x`` a batch ``(B, C, H, W)`` in ``[0, 1]`` on the classifier's device,
the result ``(B, F)`` numbers. The functions may use what :class:`EvalData` has fitted before the parts'
images are read (the classifier's training features ``d.train_base`` and ``d.train_labels``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from nad_guard.evaluate.data import EvalData

ImageColumns = dict[str, Callable[[torch.Tensor], np.ndarray]]


PROBES = "probes"  # the deep check's columns (nad_guard.probes), with EvalConfig.probes > 0


def deep_name(k: int) -> str:
    """The row name of nad-guard's deep check with ``k`` probes."""
    return f"nad-guard[deep k={k}]"


def image_columns(d: "EvalData") -> ImageColumns:
    """The per-image columns the run's configuration asks for (none by default): ``"probes"``, the deep
    check's probe columns, when ``d.cfg.probes > 0``."""
    cols: ImageColumns = {}
    if d.cfg.probes > 0:
        from nad_guard.probes import probe_columns

        spec = d.cfg.probe_spec()
        cols[PROBES] = lambda x: probe_columns(d.paths, x, spec)
    return cols
