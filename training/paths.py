"""Learning class sub-architectures (NAD masks) of a frozen classifier.

Both schedules return a fitted :class:`nad_guard.paths.PathModel`. At every gate point ``l`` each
class ``k`` has gate logits ``g[l][k]`` in ``R^C_l``; the gate ``sigmoid(g)`` multiplies the gate
point's output channel-wise (forward hooks that replace the output), and the binary mask is
``sigmoid(g) > 0.5``. The loss on a batch is

    CE(gated logits, true label)
    + mse_weight * MSE(gated, original activations), averaged over gate points and over the batch's
      samples that the original network classifies correctly
    + a sparsity term.

:func:`fit_paths` (joint, the default): all K classes at once. Each sample is gated by its own
label's gates, so one forward+backward of a mixed-class batch trains K sub-architectures. Original
activations are computed once without gradient and kept in memory when they fit in ``cache_mb``.
Sparsity: with ``target_keep``, a hinge ``sparsity * max(0, mean gate - target_keep)`` per layer,
active while the layer's mean gate over all classes and channels exceeds the target; otherwise a
fixed ``sparsity * mean gate``. Either way the penalty's gradient is taken through the gates of the
batch's samples, so each class is pushed in proportion to how often it appears, like its task loss.
Adam on the gate logits. The last ``hard_epochs`` epochs gate with the binary masks themselves
(straight-through gradient), so that the masks used at test time are the ones trained.
(A dual-ascent multiplier was tried first: it winds up while the gates
travel from +3 to 0 and then closes nearly every channel; the hinge has no state to wind up.
A negative term was tried too: a share of each batch gated by another class's gates, with loss
``-log(1 - p_c)``, so that class ``c``'s subnetwork would stop labelling other classes' images ``c``.
On the MNIST CNN (4 epochs) it lowered that rate only from 1.00 to 0.90 (25% negatives) or 0.82 (50%)
while own-class subnetwork accuracy fell to a minimum of 0.84 / 0.81 over classes, so it was dropped.)

:func:`fit_paths_nad`: NAD's released schedule, one class after another: batches of the class's
own images, an original and a gated forward per step, penalty ``beta * sum_l mean(sigmoid(g_l)^2)``,
and a normalised gradient step (each layer's gradient scaled to unit L2 norm, learning rate 0.1).

Distributed: both run unchanged under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPU).
Every rank walks the same seeded permutation and takes the slice ``batch[rank::N]`` of each global
batch; the loss terms are normalised by global counts and gate gradients are summed over ranks, so
every step is the single-process step up to floating-point summation order. One process and two give
the same masks on at least 99% of the entries (``tests/test_paths.py`` checks it).

Checkpoints: with ``checkpoint_dir`` the state (gate logits, optimiser, history) is
written after every epoch (for the NAD schedule, after every epoch of every class). A rerun with
the same settings resumes there and ends with the same masks as an uninterrupted run: permutations
are derived from ``(seed, epoch)`` and nothing else is random. A checkpoint from other settings is
refused.

Masks that cannot silently fail: after the asked epochs both schedules check the masks with
:func:`nad_guard.health.mask_problems` (a gate point keeping every channel, or none, for every class; a
class whose binary-mask subnetwork assigns less than 95% of its correctly classified images to it). While
they are degenerate, training goes on one epoch at a time (joint: through the binary masks; NAD: one more
epoch per class), checked after each, up to ``max_epochs`` (default twice the epochs); then
:class:`DegenerateMasksError` names the gate points and classes and what to change, and nothing is saved.
``metrics_["mask_check"]`` records every check. (Seen before the check: a torchvision ResNet-18 on MNIST
after 3 epochs kept every channel of every gate point, without a word: the gates start at logit +3 and
Adam moves them about ``lr`` per step, so too few steps leave them all open.)

Command line (also under ``torchrun``)::

    python -m training.paths --model mnist-cnn --data mnist5k --out runs/paths-mnist-cnn
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nad_guard.data import ImageSet, load_dataset, sample_size, stratified_split
from nad_guard.guard import save_classifier
from nad_guard.health import MIN_SUBNET_ACCURACY, MaskProblem, mask_problems
from nad_guard.models import Classifier
from nad_guard.model_names import build_classifier, graph_layers_problem
from nad_guard.hooks import hooked
from training.distributed import Ranks as _Ranks, load_checkpoint, permutation as _permutation, save_checkpoint
from training.distributed import session as _session
from nad_guard.paths import GateCoverageWarning, GatePoint, PathModel, apply_gate, discover_gate_points

CHECKPOINT_FILE = "paths-checkpoint.pt"


class GateLogits(nn.Module):
    """Gate logits ``(K, C_l)`` for every gate point; ``forward(labels)`` gives the per-sample gates
    ``sigmoid(logits[l][labels])`` ``(N, C_l)`` in ``(0, 1)``; with ``hard=True`` the binary masks
    ``sigmoid > 0.5`` in the forward pass and the sigmoid's gradient in the backward (straight-through)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], init_logit: float):
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(torch.full(s, float(init_logit))) for s in shapes])

    def forward(self, labels: torch.Tensor, hard: bool = False) -> list[torch.Tensor]:
        soft = [torch.sigmoid(g[labels]) for g in self.logits]
        if not hard:
            return soft
        return [(g > 0.5).to(g.dtype) + (g - g.detach()) for g in soft]  # exactly 0/1 forward


# --------------------------------------------------------------------------- plumbing

def _record(classifier: Classifier, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """No-grad pass: logits ``(N, K)`` and a copy of every gate point's output."""
    outs: list[torch.Tensor] = [torch.empty(0)] * len(names)

    def keep(i: int, out: torch.Tensor) -> None:
        outs[i] = out.detach().clone()

    with torch.no_grad(), hooked(classifier.net, names, keep):
        logits = classifier(x)
    return logits, outs


def _gated_loss(classifier: Classifier, names: list[str], x: torch.Tensor, y: torch.Tensor,
                gates: list[torch.Tensor], originals: list[torch.Tensor], correct: torch.Tensor,
                n_batch: int, n_correct: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's share of the global batch's cross-entropy and activation MSE.

    ``gates[l]`` ``(n, C_l)`` multiplies gate point ``l``'s output; the MSE to ``originals`` is
    averaged over elements and gate points, summed over the ``correct`` samples and divided by the
    global count ``n_correct``; the cross-entropy is summed and divided by ``n_batch``.
    """
    mse: list[torch.Tensor] = [torch.empty(0)] * len(names)

    def gate(i: int, out: torch.Tensor) -> torch.Tensor:
        gated = apply_gate(out, gates[i])
        mse[i] = (gated - originals[i]).pow(2).flatten(1).mean(1)
        return gated

    with hooked(classifier.net, names, gate):
        logits = classifier(x)
    ce = F.cross_entropy(logits, y, reduction="sum") / n_batch
    return ce, (torch.stack(mse).mean(0) * correct).sum() / max(n_correct, 1.0)


class _Originals:
    """The frozen classifier's outputs at the gate points and whether it is right, per training image.

    Held in memory (on the training device) when they fit in ``cache_mb``; recomputed per batch otherwise.
    """

    def __init__(self, classifier: Classifier, names: list[str], data: ImageSet, device: torch.device,
                 cache_mb: float, batch_size: int = 256):
        self.classifier, self.names = classifier, names
        _, outs = _record(classifier, names, data.float(0, 1).to(device))
        need = len(data) * sum(o.numel() * o.element_size() for o in outs)
        self.cached: list[torch.Tensor] | None = None
        if need <= cache_mb * 2**20:
            parts, right = [], []
            for x, y in data.batches(batch_size):
                logits, o = _record(classifier, names, x.to(device))
                parts.append(o)
                right.append(logits.argmax(1) == y.to(device))
            self.cached = [torch.cat([p[i] for p in parts]) for i in range(len(names))]
            self.correct = torch.cat(right)

    def get(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Originals ``(n, ...)`` per gate point and correctness ``(n,)`` of images ``idx`` (``x``, ``y``)."""
        if self.cached is not None:
            i = idx.to(self.correct.device)
            return [c[i] for c in self.cached], self.correct[i]
        logits, outs = _record(self.classifier, self.names, x)
        return outs, logits.argmax(1) == y


def _load_checkpoint(directory: str | Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    return load_checkpoint(directory, CHECKPOINT_FILE, config)


def _save_checkpoint(directory: str | Path | None, state: dict[str, Any], ranks: Any) -> None:
    save_checkpoint(directory, CHECKPOINT_FILE, state, ranks)


def _class_indices(data: ImageSet, k: int) -> torch.Tensor:
    return (data.labels == k).nonzero().flatten()


# --------------------------------------------------------------------------- masks that cannot silently fail

class DegenerateMasksError(ValueError):
    """The masks are still degenerate (:func:`nad_guard.health.mask_problems`) after the bound on epochs.
    ``problems``: the :class:`~nad_guard.health.MaskProblem` list; ``epochs``: epochs run (per class for
    the NAD schedule)."""

    def __init__(self, message: str, problems: list[MaskProblem], epochs: int):
        super().__init__(message)
        self.problems, self.epochs = problems, epochs


class _MaskCheck:
    """Whether masks are degenerate: kept fractions from the gate logits, and every class subnetwork's
    accuracy on the class's images of ``data`` that the classifier labels correctly (the test set when
    the fit has one, else the training set), with :func:`nad_guard.health.mask_problems`'s rule."""

    def __init__(self, classifier: Classifier, names: list[str], data: ImageSet, device: torch.device,
                 min_accuracy: float, batch_size: int = 256):
        self.classifier, self.names, self.device, self.min_accuracy = classifier, names, device, min_accuracy
        self.batch_size, self.data = batch_size, data
        with torch.no_grad():
            ok = torch.cat([classifier(x.to(device)).argmax(1).cpu() == y for x, y in data.batches(batch_size)]
                           or [torch.zeros(0, dtype=torch.bool)])
        self.own = [((data.labels == k) & ok).nonzero().flatten() for k in range(classifier.num_classes)]

    @torch.no_grad()
    def __call__(self, logits: Sequence[torch.Tensor]) -> list[MaskProblem]:
        masks = [(torch.sigmoid(g.detach().float()) > 0.5).float() for g in logits]  # as PathModel.set_gates
        kept = torch.stack([m.mean(1) for m in masks]).cpu()
        accuracy: list[float | None] = []
        for k, idx in enumerate(self.own):
            hits = 0
            for s in range(0, len(idx), self.batch_size):
                x = self.data.images[idx[s:s + self.batch_size]].float().div_(255.0).to(self.device)
                gates = [m[k].expand(len(x), -1) for m in masks]
                with hooked(self.classifier.net, self.names, lambda i, out: apply_gate(out, gates[i])):
                    hits += int((self.classifier(x).argmax(1) == k).sum())
            accuracy.append(hits / len(idx) if len(idx) else None)
        return mask_problems(self.names, kept.numpy(), self.classifier.class_names, accuracy,
                             min_subnet_accuracy=self.min_accuracy)


def _agree(ranks: "_Ranks", problems: list[MaskProblem], device: torch.device) -> bool:
    """Whether any rank found problems (every rank decides alike, so none waits for another)."""
    return ranks.sum_(torch.tensor([float(bool(problems))], device=device)).item() > 0


def _max_epochs(epochs: int, max_epochs: int | None) -> int:
    bound = 2 * epochs if max_epochs is None else max_epochs
    if bound < epochs:
        raise ValueError(f"max_epochs ({bound}) must be at least epochs ({epochs})")
    return bound


def _degenerate_message(problems: list[MaskProblem], config: dict[str, Any], ran: int, bound: int) -> str:
    """What is degenerate, and what to change (command-line options of ``nad-guard fit-paths``)."""
    joint = config["schedule"] == "joint"
    unit = "epochs" if joint else "epochs per class"
    lines = [f"the learned masks are degenerate after {ran} {unit} ({config['epochs']} asked, then trained on to "
             f"the bound of {bound}, --max-epochs):"] + [f"  - {p.text}" for p in problems[:8]]
    if len(problems) > 8:
        lines.append(f"  - and {len(problems) - 8} more of the same kinds")
    kinds = {p.kind for p in problems}
    layers = ",".join(config["layers"])
    if "keeps-all" in kinds:
        if joint:
            n, bs = config["train_images"], config["batch_size"]
            sampled = re.search(r"\[\d+\]$", config["train_set"]) is not None  # sample_training_set's name
            steps = math.ceil(n / bs)
            lines.append(
                f"  The gates start open (logit {config['init_logit']:+g}) and Adam moves a logit by about the "
                f"learning rate ({config['lr']:g}) per step, so closing one takes at least "
                f"{math.ceil(config['init_logit'] / config['lr'])} steps; this run made {steps} per epoch "
                f"({n} images, batch {bs}), {steps * ran} in all. Train longer (--epochs, or --max-epochs to let "
                f"it continue), use {'more images (a larger --max-images), ' if sampled else ''}"
                "a smaller --batch-size, or raise --lr.")
        else:
            lines.append(f"  Each step moves a gate point's logits by the learning rate ({config['lr']:g}) in L2 "
                         "norm, shared by all its channels: train longer (--epochs), raise --lr, or raise the sparsity "
                         f"coefficient (--beta, now {config['beta']:g}).")
    keep = (f"raise --target-keep (now {config['target_keep']:g})" if joint and config.get("target_keep") is not None
            else f"lower the sparsity coefficient (sparsity, now {config['sparsity']:g})" if joint
            else f"lower --beta (now {config['beta']:g})")
    if "keeps-none" in kinds:
        lines.append(f"  Ask for more channels: {keep}.")
    if "subnet-accuracy" in kinds:
        lines.append(f"  The masks keep too little for those classes: {keep}, or train longer (--epochs) so the "
                     "epochs through the binary masks can repair them.")
    lines.append(f"  A gate point that will not learn can be left out: --layers (now {layers}). Nothing was saved; "
                 "with --checkpoint-dir a rerun with a larger --max-epochs resumes where this one stopped.")
    return "\n".join(lines)


def sample_training_set(train: ImageSet, max_images: int | None, seed: int = 0) -> ImageSet:
    """A seeded stratified sample of ``max_images`` images of ``train`` (:func:`nad_guard.data.stratified_split`),
    named ``<name>[<max_images>]``; all of ``train`` when ``max_images`` is ``None`` or not smaller (larger: a
    :class:`~nad_guard.data.SampleSizeNotice` says so)."""
    if sample_size(max_images, train, "training split") is None:
        return train
    if max_images < train.num_classes:
        raise ValueError(f"--max-images {max_images} is fewer than the {train.num_classes} classes: a stratified "
                         "sample needs at least one image per class")
    _, keep = stratified_split(train.labels.numpy(), max_images, seed=seed)
    return train.subset(keep, f"{train.name}[{max_images}]")


@torch.no_grad()
def evaluate_paths(model: PathModel, test_set: ImageSet, batch_size: int = 256, others: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """The report of a fitted :class:`PathModel` on held-out images.

    Returns a JSON-ready dict: ``kept_fraction`` (layer -> per-class share of channels kept) and its
    means per layer and overall; per class the original classifier's accuracy on the class's test
    images, and the accuracy of the class's binary-mask subnetwork on them (``subnet_accuracy_all``)
    and on those the original classifies correctly (``subnet_accuracy_on_correct``; ``None`` without
    such images); ``subnet_other_rate``, the share of other classes' correctly classified images (from
    a seeded sample of ``others`` test images) that the subnetwork also assigns to its class: near 1
    means a degenerate subnetwork that answers its class whatever the input; the ``similarity``
    matrix (K x K mean Jaccard index of masks over layers).
    """
    clf = model.classifier
    device = clf.mean.device
    sample = test_set.subset(_permutation(len(test_set), seed, -1)[:others])
    sample_ok = torch.cat([clf(x.to(device)).argmax(1).cpu() == y for x, y in sample.batches(batch_size)])
    sample = sample.subset(sample_ok.nonzero().flatten())

    def subnet_says_k(data: ImageSet, k: int) -> torch.Tensor:
        return torch.cat([model.subnetwork_logits(x.to(device), torch.full((len(x),), k)).argmax(1).cpu() == k
                          for x, _ in data.batches(batch_size)] or [torch.zeros(0, dtype=torch.bool)])

    per_class = []
    for k, name in enumerate(clf.class_names):
        own = test_set.subset(_class_indices(test_set, k))
        o = torch.cat([clf(x.to(device)).argmax(1).cpu() == k for x, _ in own.batches(batch_size)]
                      or [torch.zeros(0, dtype=torch.bool)])
        s = subnet_says_k(own, k)
        per_class.append({
            "class": name, "images": len(o), "original_accuracy": _mean(o), "subnet_accuracy_all": _mean(s),
            "subnet_accuracy_on_correct": _mean(s[o]),
            "subnet_other_rate": _mean(subnet_says_k(sample.subset((sample.labels != k).nonzero().flatten()), k)),
        })
    kept = model.kept_fraction()
    on_correct = [c["subnet_accuracy_on_correct"] for c in per_class if c["subnet_accuracy_on_correct"] is not None]
    other = [c["subnet_other_rate"] for c in per_class if c["subnet_other_rate"] is not None]
    return {
        "kept_fraction": {n: kept[j].tolist() for j, n in enumerate(model.layer_names_)},
        "kept_fraction_per_layer": {n: kept[j].mean().item() for j, n in enumerate(model.layer_names_)},
        "kept_fraction_mean": kept.mean().item(),
        "classes": per_class,
        "subnet_accuracy_on_correct_mean": sum(on_correct) / len(on_correct) if on_correct else None,
        "subnet_accuracy_on_correct_min": min(on_correct) if on_correct else None,
        "subnet_other_rate_mean": sum(other) / len(other) if other else None,
        "similarity": model.similarity().tolist(),
    }


def _mean(b: torch.Tensor) -> float | None:
    return b.float().mean().item() if len(b) else None


def _finish(classifier: Classifier, names: list[str], logits: list[torch.Tensor], train_set: ImageSet,
            test_set: ImageSet | None, config: dict[str, Any], history: list[dict[str, Any]], ranks: _Ranks,
            seconds: float, progress: bool, mask_check: dict[str, Any] | None = None) -> PathModel:
    """Binary masks from the gate logits, channel statistics from ``train_set``, the report on ``test_set``."""
    gates = {n: torch.sigmoid(g.detach()).cpu() for n, g in zip(names, logits)}
    model = PathModel(classifier, names).set_gates(gates)
    t0 = time.time()
    model.fit_stats(train_set, progress=progress and ranks.rank == 0)
    stats_seconds = time.time() - t0
    metrics: dict[str, Any] = evaluate_paths(model, test_set) if test_set is not None else {}
    metrics |= {"history": history, "train_seconds": round(seconds, 2), "stats_seconds": round(stats_seconds, 2),
                "world_size": ranks.world, **{k: v for k, v in model.metrics_.items() if k.startswith("stats_")},
                **({"mask_check": mask_check} if mask_check is not None else {})}
    return model.set_gates(gates, stats=model.stats_, training=config, metrics=metrics)


# --------------------------------------------------------------------------- the joint schedule

def _sparsity_coefficients(gates: GateLogits, target_keep: float | None, sparsity: float) -> list[float]:
    """Per layer: ``sparsity`` while the layer's mean gate exceeds ``target_keep`` (always without a
    target), else 0: the derivative of the hinge ``sparsity * max(0, mean gate - target_keep)``."""
    if target_keep is None:
        return [sparsity] * len(gates.logits)
    with torch.no_grad():
        return [sparsity if torch.sigmoid(g).mean().item() > target_keep else 0.0 for g in gates.logits]


def _gate_points(classifier: Classifier, layers: Sequence[str] | None, show: bool) -> list[GatePoint]:
    """The gate points, as a table on stderr before training when ``show`` (rank 0), then a
    :class:`~nad_guard.paths.GateCoverageWarning` if they are few or shallow."""
    found = discover_gate_points(classifier, layers, warn=False)
    if show and int(os.environ.get("RANK", "0")) == 0:
        print(found.describe(), file=sys.stderr, flush=True)
    if found.warning:
        warnings.warn(found.warning, GateCoverageWarning, stacklevel=3)
    return list(found.points)


def fit_paths(classifier: Classifier, train_set: ImageSet, test_set: ImageSet | None = None, *,
              layers: Sequence[str] | None = None, target_keep: float | None = 0.25, sparsity: float = 1.0,
              mse_weight: float = 1.0, epochs: int = 10, hard_epochs: int = 1, batch_size: int = 128,
              lr: float = 0.05, init_logit: float = 3.0, cache_mb: float = 1024, device: str = "auto",
              seed: int = 0, checkpoint_dir: str | Path | None = None, progress: bool = True,
              max_epochs: int | None = None, min_subnet_accuracy: float = MIN_SUBNET_ACCURACY,
              check: bool = True) -> PathModel:
    """Learn all classes' sub-architectures jointly (see the module docstring).

    Args:
        classifier: the frozen classifier (unchanged; moved to ``device`` for the run and back).
        train_set, test_set: images and labels; ``test_set`` (optional) feeds the report in ``metrics_``.
        layers: gate point names (``None``: :func:`nad_guard.paths.discover_gate_points`'s choice; the
            points are printed on stderr with ``progress``, and weak ones warned).
        target_keep: wanted mean kept fraction per layer, in ``(0, 1)``, or ``None`` for a plain
            penalty ``sparsity * mean gate``.
        sparsity: coefficient of the sparsity penalty (with a target, larger values overshoot it:
            Adam's step sizes shrink after large penalty gradients).
        mse_weight: weight of the activation MSE term.
        epochs, batch_size, lr: passes over ``train_set``, global batch size, Adam learning rate.
        hard_epochs: the last ``hard_epochs`` epochs gate with the binary masks themselves (straight-through
            gradient to the soft gates), so that the masks used at test time are the ones trained. Without
            it a CIFAR-10 class whose soft-gated subnetwork was right on its images lost half of them once
            its gates were thresholded (frog: 48%; 20 of its 352 gates lay between 0.3 and 0.7).
        init_logit: initial gate logit (+3: gates open at 0.95).
        cache_mb: memory allowed for cached original activations.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: the permutation seed; runs are repeatable.
        checkpoint_dir: where to checkpoint after every epoch and resume from.
        max_epochs: the bound on epochs (default ``2 * epochs``). After ``epochs`` the masks are checked
            (:func:`nad_guard.health.mask_problems`: a gate point keeping every channel or none for every
            class, a class subnetwork below ``min_subnet_accuracy`` on the class's correctly classified
            images of ``test_set``, or of ``train_set`` without one); while they are degenerate, training
            goes on one epoch at a time (through the binary masks when ``hard_epochs`` > 0), checked after
            each, up to ``max_epochs``; then :class:`DegenerateMasksError` names what is wrong and what to
            change. ``metrics_["mask_check"]`` records the checks. ``check=False`` skips it all.
    """
    if target_keep is not None and not 0 < target_keep < 1:
        raise ValueError(f"target_keep must lie in (0, 1), got {target_keep}")
    if not 0 <= hard_epochs <= epochs:
        raise ValueError(f"hard_epochs must lie in [0, epochs={epochs}], got {hard_epochs}")
    bound = _max_epochs(epochs, max_epochs)
    points = _gate_points(classifier, layers, progress)
    names = [p.name for p in points]
    config = {"schedule": "joint", "layers": names, "target_keep": target_keep, "sparsity": sparsity,
              "mse_weight": mse_weight, "epochs": epochs, "hard_epochs": hard_epochs, "batch_size": batch_size,
              "lr": lr,
              "init_logit": init_logit, "seed": seed, "train_set": train_set.name, "train_images": len(train_set)}
    t0 = time.time()
    with _session(classifier, device) as (ranks, dev):
        gates = GateLogits([(classifier.num_classes, p.channels) for p in points], init_logit).to(dev)
        opt = torch.optim.Adam(gates.parameters(), lr=lr)
        start, history, checks = 0, [], []
        state = _load_checkpoint(checkpoint_dir, config)
        if state is not None:
            gates.load_state_dict(state["gates"])
            opt.load_state_dict(state["optimizer"])
            start, history, checks = state["epoch"], state["history"], state.get("checks", [])
        originals = _Originals(classifier, names, train_set, dev, cache_mb)
        checker = _MaskCheck(classifier, names, test_set or train_set, dev, min_subnet_accuracy) if check else None
        n = len(train_set)
        bar = tqdm(total=epochs, initial=min(start, epochs), desc="fit-paths", disable=not progress or ranks.rank != 0)
        epoch, problems = start, []
        while True:
            if epoch >= epochs:
                if checker is None:
                    break
                problems = checker(list(gates.logits))
                if not checks or checks[-1]["epoch"] != epoch:
                    checks.append({"epoch": epoch, "problems": [p.text for p in problems]})
                if not _agree(ranks, problems, dev) or epoch >= bound:
                    break
                if ranks.rank == 0 and progress:
                    tqdm.write(f"fit-paths: masks degenerate after {epoch} epochs ({problems[0].text}"
                               f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}): one more epoch "
                               f"(bound {bound})")
                bar.total = epoch + 1
                bar.refresh()
            perm = _permutation(n, seed, epoch)
            totals = torch.zeros(3, dtype=torch.float64)
            for s in tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}", leave=False, disable=bar.disable):
                idx = perm[s:s + batch_size]
                local = ranks.shard(idx)
                x, y = train_set.images[local].float().div_(255.0).to(dev), train_set.labels[local].to(dev)
                orig, correct = originals.get(local, x, y)
                n_correct = ranks.sum_(correct.sum().double().reshape(1)).item()
                for p in gates.parameters():
                    p.grad = torch.zeros_like(p)
                g = gates(y, hard=hard_epochs > 0 and epoch >= epochs - hard_epochs)
                ce, mse = _gated_loss(classifier, names, x, y, g, orig, correct, len(idx), n_correct)
                coef = _sparsity_coefficients(gates, target_keep, sparsity)
                penalty = sum(c * gl.mean(1).sum() for c, gl in zip(coef, g)) / len(idx)
                (ce + mse_weight * mse + penalty).backward()
                for p in gates.parameters():
                    ranks.sum_(p.grad)
                opt.step()
                totals += torch.tensor([ce.item(), mse.item(), 1.0], dtype=torch.float64) * len(local)
            totals = ranks.sum_(totals.to(dev)).cpu()
            with torch.no_grad():
                kept = [(gl > 0).float().mean().item() for gl in gates.logits]
            history.append({"epoch": epoch + 1, "ce": totals[0].item() / totals[2].item(),
                            "mse": totals[1].item() / totals[2].item(), "kept_fraction": kept})
            bar.set_postfix(ce=f"{history[-1]['ce']:.3f}", kept=f"{sum(kept) / len(kept):.2f}")
            bar.update(1)
            epoch += 1
            _save_checkpoint(checkpoint_dir, {"config": config, "epoch": epoch, "gates": gates.state_dict(),
                                              "optimizer": opt.state_dict(), "history": history, "checks": checks},
                             ranks)
        bar.close()
        if problems:
            raise DegenerateMasksError(_degenerate_message(problems, config, epoch, bound), problems, epoch)
        mask_check = None if checker is None else {
            "epochs_asked": epochs, "epochs_run": epoch, "max_epochs": bound, "checks": checks,
            "min_subnet_accuracy": min_subnet_accuracy, "checked_on": (test_set or train_set).name}
        return _finish(classifier, names, list(gates.logits), train_set, test_set, config, history, ranks,
                       time.time() - t0, progress, mask_check)


# --------------------------------------------------------------------------- NAD's one-class schedule

def fit_paths_nad(classifier: Classifier, train_set: ImageSet, test_set: ImageSet | None = None, *,
                  layers: Sequence[str] | None = None, beta: float = 1.0, mse_weight: float = 1.0,
                  epochs: int = 21, batch_size: int = 16, lr: float = 0.1, init_logit: float = 3.0,
                  device: str = "auto", seed: int = 0, checkpoint_dir: str | Path | None = None,
                  progress: bool = True, max_epochs: int | None = None,
                  min_subnet_accuracy: float = MIN_SUBNET_ACCURACY, check: bool = True) -> PathModel:
    """Learn the sub-architectures one class after another, as NAD's released code does.

    For each class: ``epochs`` passes over its training images in batches of ``batch_size``; per step
    an original and a gated forward, loss CE + ``mse_weight`` * MSE + ``beta * sum_l mean(sigmoid(g_l)^2)``
    and the step ``g_l -= lr * grad_l / ||grad_l||``. NAD used ``beta`` 4.5 for VGG-16 and 0.02 for
    ResNet-50 on ImageNet: the right value depends on the architecture. Other arguments as in
    :func:`fit_paths`; while the masks are degenerate after ``epochs``, every class gets one more epoch
    per round (class by class), checked after each round, up to ``max_epochs`` per class.
    """
    bound = _max_epochs(epochs, max_epochs)
    points = _gate_points(classifier, layers, progress)
    names = [p.name for p in points]
    config = {"schedule": "nad", "layers": names, "beta": beta, "mse_weight": mse_weight, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "init_logit": init_logit, "seed": seed,
              "train_set": train_set.name, "train_images": len(train_set)}
    t0 = time.time()
    with _session(classifier, device) as (ranks, dev):
        logits = [torch.full((classifier.num_classes, p.channels), float(init_logit), device=dev) for p in points]
        done, history, checks = 0, [], []  # done: epochs finished so far, over all classes
        state = _load_checkpoint(checkpoint_dir, config)
        if state is not None:
            logits = [t.to(dev) for t in state["logits"]]
            done, history, checks = state["done"], state["history"], state.get("checks", [])
        checker = _MaskCheck(classifier, names, test_set or train_set, dev, min_subnet_accuracy) if check else None
        n_classes, planned = classifier.num_classes, classifier.num_classes * epochs
        bar = tqdm(total=planned, initial=min(done, planned), desc="fit-paths-nad",
                   disable=not progress or ranks.rank != 0)
        problems: list[MaskProblem] = []
        while True:
            if done >= planned and (done - planned) % n_classes == 0:  # after the plan, then after each round
                if checker is None:
                    break
                per_class = epochs + (done - planned) // n_classes
                problems = checker(logits)
                if not checks or checks[-1]["epoch"] != per_class:
                    checks.append({"epoch": per_class, "problems": [p.text for p in problems]})
                if not _agree(ranks, problems, dev) or per_class >= bound:
                    break
                if ranks.rank == 0 and progress:
                    tqdm.write(f"fit-paths: masks degenerate after {per_class} epochs per class ({problems[0].text}): "
                               f"one more epoch for every class (bound {bound})")
                bar.total = done + n_classes
                bar.refresh()
            if done < planned:
                k, epoch = divmod(done, epochs)
            else:  # extra rounds: one epoch per class
                r, k = divmod(done - planned, n_classes)
                epoch = epochs + r
            own = _class_indices(train_set, k)
            perm = own[_permutation(len(own), seed, k, epoch)]
            g = [t[k].clone().requires_grad_() for t in logits]
            totals = torch.zeros(3, dtype=torch.float64)
            for s in range(0, len(perm), batch_size):
                idx = perm[s:s + batch_size]
                local = ranks.shard(idx)
                x, y = train_set.images[local].float().div_(255.0).to(dev), train_set.labels[local].to(dev)
                out, orig = _record(classifier, names, x)
                correct = out.argmax(1) == y
                n_correct = ranks.sum_(correct.sum().double().reshape(1)).item()
                gates = [torch.sigmoid(gl).expand(len(local), -1) for gl in g]
                ce, mse = _gated_loss(classifier, names, x, y, gates, orig, correct, len(idx), n_correct)
                penalty = beta * sum(torch.sigmoid(gl).pow(2).mean() for gl in g) / ranks.world
                grads = torch.autograd.grad(ce + mse_weight * mse + penalty, g)
                with torch.no_grad():
                    for gl, gr in zip(g, grads):
                        gr = ranks.sum_(gr.clone())
                        gl -= lr * gr / gr.norm().clamp_min(1e-12)
                totals += torch.tensor([ce.item(), mse.item(), 1.0], dtype=torch.float64) * len(local)
            for t, gl in zip(logits, g):
                t[k] = gl.detach()
            done += 1
            totals = ranks.sum_(totals.to(dev)).cpu()
            history.append({"class": k, "epoch": epoch + 1, "ce": totals[0].item() / max(totals[2].item(), 1),
                            "mse": totals[1].item() / max(totals[2].item(), 1)})
            bar.update(1)
            _save_checkpoint(checkpoint_dir, {"config": config, "done": done, "logits": [t.cpu() for t in logits],
                                              "history": history, "checks": checks}, ranks)
        bar.close()
        ran = epochs + max(0, done - planned) // n_classes
        if problems:
            raise DegenerateMasksError(_degenerate_message(problems, config, ran, bound), problems, ran)
        mask_check = None if checker is None else {
            "epochs_asked": epochs, "epochs_run": ran, "max_epochs": bound, "checks": checks,
            "min_subnet_accuracy": min_subnet_accuracy, "checked_on": (test_set or train_set).name}
        return _finish(classifier, names, logits, train_set, test_set, config, history, ranks, time.time() - t0,
                       progress, mask_check)


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.paths", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--mean", help="torchvision / .pt2 models: comma-separated per-channel mean")
    ap.add_argument("--std", help="torchvision / .pt2 models: comma-separated per-channel std")
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-root")
    ap.add_argument("--out", required=True, help="artifact directory (meta.json, paths.safetensors)")
    ap.add_argument("--schedule", choices=("joint", "nad"), default="joint")
    ap.add_argument("--layers", help="comma-separated gate point names (default: automatic)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--target-keep", type=float, default=0.25, help="joint schedule")
    ap.add_argument("--hard-epochs", type=int, default=1, help="joint schedule: epochs through the binary masks")
    ap.add_argument("--beta", type=float, default=1.0, help="NAD schedule")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--max-images", type=int, help="seeded stratified sample of the training set")
    ap.add_argument("--max-epochs", type=int, help="bound on epochs while the masks are degenerate (default 2x)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    summary = fit_and_save(a.model, a.data, a.out, weights=a.weights, mean=a.mean, std=a.std, data_root=a.data_root,
                           schedule=a.schedule,
                           layers=a.layers.split(",") if a.layers else None, epochs=a.epochs,
                           batch_size=a.batch_size, lr=a.lr, target_keep=a.target_keep, hard_epochs=a.hard_epochs,
                           beta=a.beta, max_images=a.max_images, max_epochs=a.max_epochs,
                           device=a.device, seed=a.seed, checkpoint_dir=a.checkpoint_dir, progress=not a.no_progress)
    if summary is not None:
        print(json.dumps(summary))


def fit_and_save(model: str, data: str, out: str | Path, *, weights: str | None = None,
                 mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None,
                 data_root: str | None = None, schedule: str = "joint", layers: Sequence[str] | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 target_keep: float = 0.25, hard_epochs: int = 1, beta: float = 1.0, device: str = "auto", seed: int = 0,
                 checkpoint_dir: str | None = None, max_images: int | None = None, max_epochs: int | None = None,
                 check_masks: bool = True, progress: bool = True) -> dict[str, Any] | None:
    """Load data and classifier (``model``, ``weights``, ``mean``, ``std``: see
    :func:`nad_guard.model_names.build_classifier`), learn the paths with ``schedule`` and save the artifact to
    ``out`` with the classifier's weights and how to rebuild it (:func:`nad_guard.guard.save_classifier`),
    so that later commands need only the directory (rank 0 only under torchrun). Returns a summary of
    the metrics on rank 0, else ``None``.

    ``max_images``: learn from a seeded (``seed``), stratified sample of that many training images
    (:func:`sample_training_set`; the channel statistics come from the same sample). ``max_epochs``: the
    bound of :func:`fit_paths`'s degenerate-mask check (:class:`DegenerateMasksError` past it);
    ``check_masks=False`` skips that check (``nad-guard check`` still reports degenerate masks of the saved
    artifact)."""
    train, test = load_dataset(data, data_root)
    clf = build_classifier(model, weights, class_names=train.classes, input_size=train.shape[1],
                           channels=train.shape[0], mean=mean, std=std)
    problem = graph_layers_problem(clf, layers)
    if problem:
        raise ValueError(problem)
    train = sample_training_set(train, max_images, seed)
    common: dict[str, Any] = {"layers": layers, "device": device, "seed": seed, "checkpoint_dir": checkpoint_dir,
                              "progress": progress, "max_epochs": max_epochs, "check": check_masks}
    common |= {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    if schedule == "joint":
        pm = fit_paths(clf, train, test, target_keep=target_keep, hard_epochs=hard_epochs, **common)
    elif schedule == "nad":
        pm = fit_paths_nad(clf, train, test, beta=beta, **common)
    else:
        raise ValueError(f"schedule must be 'joint' or 'nad', got {schedule!r}")
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    pm.save(out)
    record = save_classifier(out, clf)
    check = pm.metrics_.get("mask_check") or {}
    return {"out": str(out), "model": record.get("model", record["name"]), "train_set": train.name,
            "train_images": len(train), "epochs_run": check.get("epochs_run"), **{k: pm.metrics_.get(k) for k in (
                "kept_fraction_mean", "subnet_accuracy_on_correct_mean", "subnet_accuracy_on_correct_min",
                "subnet_other_rate_mean", "train_seconds")}}

if __name__ == "__main__":
    main()
