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


def image_columns(d: "EvalData") -> ImageColumns:
    """The per-image columns the run's configuration asks for (none by default)."""
    cols: ImageColumns = {}
    if d.cfg.encoder is not None:  # NND's gate vector against the class masks and mean encodings (docs/encoder.md)
        from nad_guard.encoder import ArchitectureEncoder, encoder_features
        from nad_guard.hooks import device_of

        enc = ArchitectureEncoder.load(d.cfg.encoder, d.paths.classifier).to(device_of(d.paths.classifier))
        cols["nnd-encoder"] = lambda x: encoder_features(enc, d.paths, x)[0].numpy()
    return cols
