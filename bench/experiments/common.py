"""Shared set-up of the development experiments in ``bench/experiments/*/``: the command-line options
naming the guard and data, and ``nad-guard evaluate``'s splits, cached attacks and features for them.

Only public names of ``nad_guard`` are used (``tests/test_architecture.py`` checks every file under
``bench/``). A script in an experiment's folder puts this folder on ``sys.path`` and imports it as
``common``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from nad_guard.attacks import default_cache_dir
from nad_guard.data import load_dataset
from nad_guard.evaluate import EvalConfig, EvalData
from nad_guard.models import load_reference
from nad_guard.paths import PathModel

REPO = Path(__file__).resolve().parents[2]
#: The committed CIFAR-10 ResNet-20 guard. Its paths (``paths.safetensors``, unchanged since 4956c15) are
#: those of the artifact the experiments ran on, then kept outside the repository as ``runs/cifar_guard``.
DEFAULT_ARTIFACT = "bench/results/guard_cifar10-resnet20"


def experiment_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser showing ``doc`` with ``--artifact``, ``--model``, ``--data`` and ``--images``, whose
    defaults are what every experiment ran with."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=DEFAULT_ARTIFACT,
                        help="Path artifact from `nad-guard fit-paths` (a detector in it is not used); a relative "
                             "path not found here is taken from the repository root (default: %(default)s).")
    parser.add_argument("--model", default="cifar10-resnet20", help="Reference classifier (default: %(default)s).")
    parser.add_argument("--data", default="cifar10", help="Data set (default: %(default)s).")
    parser.add_argument("--images", type=int, default=3000,
                        help="Seeded stratified sample of this many test images, as `nad-guard evaluate "
                             "--max-images`; 0: all (default: %(default)s).")
    return parser


def artifact_path(artifact: str) -> Path:
    """``artifact`` as given when it exists from here, else taken from the repository root."""
    p = Path(artifact)
    return p if p.is_absolute() or p.exists() else REPO / p


def evaluation_data(encodings: tuple[str, ...], art: str = DEFAULT_ARTIFACT, model: str = "cifar10-resnet20",
                    data: str = "cifar10", n: int = 3000, verbose: bool = False, threads: int = 2,
                    log: Callable[[str], None] | None = None) -> EvalData:
    """``nad-guard evaluate``'s splits, attacks (read from the cache ``$NAD_GUARD_CACHE/attacks``, generated
    there when missing) and features (``encodings``) for the guard at ``art`` on the first ``n`` test images
    (0: all), on ``threads`` torch threads. The fit-part experiments read its fit part's feature sets only
    (``FeatureKey`` part ``"fit"``): the calibration and evaluation parts give the committed results."""
    torch.set_num_threads(threads)
    pm = PathModel.load(artifact_path(art), load_reference(model))
    train, test = load_dataset(data)
    cfg = EvalConfig(suite="cifar10" if "cifar" in data else "mnist", max_images=n or None, train_images=1000,
                     progress=False, device="cpu", encodings=encodings)
    t0 = time.time()
    d = EvalData(pm, train, test, cfg, default_cache_dir(), log or (lambda m: None))
    if verbose:
        print(f"features {time.time() - t0:.0f} s; attacks {d.usable}", flush=True)
    return d
