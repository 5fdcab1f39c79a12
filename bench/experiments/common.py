"""Shared set-up of the development experiments on the detection evaluation's detector-fit part
(``clean_only_experiment.py``, ``seen_learners_experiment.py``, ``logit_features_experiment.py``)."""
from __future__ import annotations

import time

import torch

from nad_guard.attacks import default_cache_dir
from nad_guard.data import load_dataset
from nad_guard.evaluate import EvalConfig, EvalData
from nad_guard.models import load_reference
from nad_guard.paths import PathModel


def evaluation_data(encodings: tuple[str, ...], art: str = "runs/cifar_guard", model: str = "cifar10-resnet20",
                    data: str = "cifar10", n: int = 3000, verbose: bool = False) -> EvalData:
    """``nad-guard evaluate``'s splits, cached attacks and features (``encodings``) for the guard at
    ``art`` on the first ``n`` test images (0: all), on 2 torch threads. The experiments read its
    ``fit:*`` keys only: the calibration and evaluation parts give the committed results."""
    torch.set_num_threads(2)
    pm = PathModel.load(art, load_reference(model))
    train, test = load_dataset(data)
    cfg = EvalConfig(suite="cifar10" if "cifar" in data else "mnist", max_images=n or None, train_images=1000,
                     progress=False, device="cpu", encodings=encodings)
    t0 = time.time()
    d = EvalData(pm, train, test, cfg, default_cache_dir(), lambda m: None)
    if verbose:
        print(f"features {time.time() - t0:.0f} s; attacks {d.usable}", flush=True)
    return d
