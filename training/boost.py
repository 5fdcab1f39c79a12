"""Fine-tuning a :class:`nad_guard.encoder.BoostedResNet`: a copy of a CIFAR ResNet with top-k (winner-take-all)
gates on every block's inner channels, trained jointly with its saliency predictors.

Loss per batch: Hinton et al.'s distillation from the frozen original (``alpha * T^2 * KL`` at temperature
``T``) plus ``(1 - alpha)`` times the cross-entropy to the labels (:func:`nad_guard.encoder.kd_loss`). The
predictors start at the least-squares fit of each block's pooled inner activation from its pooled input
(``BoostedResNet.fit_predictors``, on ``init_images`` training images). SGD with Nesterov momentum 0.9,
weight decay ``5e-4`` on the convolution and linear weights, a cosine learning rate from ``lr`` to 0 over
all steps, batch norm in training mode; each batch randomly cropped (4-pixel zero padding) and flipped,
the original's logits computed on the same augmented batch. Seeded (``seed``: batch order and augmentation).
One process; the result is written after every epoch (``out``), the last one being the fit.

The fitted network is a different network from the guard's classifier, which never changes.

    python -m training.boost --artifact bench/results/guard_cifar10-resnet20 --data cifar10 --keep 0.65 \\
        --epochs 3 --out runs/boosted
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nad_guard.data import ImageSet, load_dataset
from nad_guard.encoder import BoostedResNet, kd_loss
from nad_guard.guard import artifact_classifier, resolve_guard_dir
from nad_guard.models import Classifier
from training.distributed import permutation


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after ``pad``-pixel zero padding and random horizontal flip, per image of ``x`` (N, C, H, W)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: ImageSet, batch_size: int = 250) -> float:
    """Share of ``data`` a classifier on ``[0, 1]`` images gets right."""
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(batch_size))
    return right / len(data)


def fit_boosted(original: Classifier, train: ImageSet, test: ImageSet | None = None, *, keep: float = 0.65,
                epochs: int = 3, batch_size: int = 128, lr: float = 0.02, alpha: float = 0.9, temperature: float = 4.0,
                weight_decay: float = 5e-4, init_images: int = 2000, seed: int = 0, out: str | Path | None = None,
                log_every: int = 50, start: BoostedResNet | None = None,
                clip: float = 5.0) -> tuple[BoostedResNet, dict[str, Any]]:
    """Fit (above) on ``train``; returns the network (eval mode) and the metrics (history, time, test accuracy).
    ``start``: continue from this fitted network (its ``keep``; predictors not refitted) with a new schedule.
    ``clip``: the gradients' global norm is clipped to it (a 6-epoch run without clipping diverged: the saliency
    scores grew to infinity and the loss became NaN in epoch 2); a non-finite loss stops the fit with an error."""
    config = {"keep": keep, "epochs": epochs, "batch_size": batch_size, "lr": lr, "alpha": alpha,
              "temperature": temperature, "weight_decay": weight_decay, "init_images": init_images, "seed": seed,
              "clip": clip, "train_set": train.name, "train_images": len(train)}
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if start is None:
        model = BoostedResNet(original, keep)
        init = permutation(len(train), seed, -2)[:init_images]
        model.fit_predictors(original.normalize(train.images[init].float().div_(255.0)))
    else:
        model = start.requires_grad_(True)
        config |= {"keep": start.keep, "continued_from": {"training": getattr(start, "training_meta", {}),
                                                          "metrics": getattr(start, "metrics_meta", {})}}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if test is not None:
        metrics["test_accuracy_original"] = accuracy(original, test)
        metrics["test_accuracy_start"] = _test_accuracy(model.eval(), original, test)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = permutation(len(train), seed, epoch)
        run_loss, run_right, run_n = 0.0, 0, 0
        for s in range(0, len(train), batch_size):
            idx = perm[s:s + batch_size]
            x = augment(train.images[idx].float().div_(255.0), gen)
            y = train.labels[idx]
            with torch.no_grad():
                teacher = original(x)
            logits = model(original.normalize(x))
            loss = kd_loss(logits, teacher, y, alpha=alpha, temperature=temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}: the fit "
                                         "diverged; lower --lr or --clip")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach()) * len(idx)
            run_right += int((logits.argmax(1) == y).sum())
            run_n += len(idx)
            if step % log_every == 0:
                print(f"epoch {epoch + 1} step {step}/{steps} loss {run_loss / run_n:.4f} "
                      f"train acc {run_right / run_n:.4f} {time.time() - t0:.0f}s", flush=True)
        model.eval()
        row = {"epoch": epoch + 1, "loss": run_loss / run_n, "train_accuracy": run_right / run_n,
               "seconds": round(time.time() - t0, 1)}
        if test is not None:
            row["test_accuracy"] = _test_accuracy(model, original, test)
        history.append(row)
        print(json.dumps(row), flush=True)
        metrics |= {"history": history, "train_seconds": round(time.time() - t0, 1)}
        if out is not None:
            model.save(out, training=config, metrics=metrics)
    return model.eval(), metrics


@torch.no_grad()
def _test_accuracy(model: BoostedResNet, original: Classifier, data: ImageSet, batch_size: int = 250) -> float:
    right = sum(int((model(original.normalize(x)).argmax(1) == y).sum()) for x, y in data.batches(batch_size))
    return right / len(data)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.boost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default="bench/results/guard_cifar10-resnet20",
                    help="guard or path artifact whose classifier is copied")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-root")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep", type=float, default=0.65, help="share of every block's inner channels open per input")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--max-images", type=int, help="a seeded sample of the training images (default: all)")
    ap.add_argument("--test-images", type=int, default=2000, help="seeded test sample measured after every epoch")
    ap.add_argument("--clip", type=float, default=5.0, help="global gradient-norm clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", help="directory of a fitted network to continue from (a new schedule of --epochs)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    original = artifact_classifier(resolve_guard_dir(a.artifact))
    train, test = load_dataset(a.data, a.data_root)
    if a.max_images is not None and a.max_images < len(train):
        train = train.subset(permutation(len(train), a.seed, -3)[:a.max_images], f"{train.name}[{a.max_images}]")
    if a.test_images < len(test):
        test = test.subset(permutation(len(test), a.seed, -1)[:a.test_images], f"{test.name}[{a.test_images}]")
    start = BoostedResNet.load(a.start, original) if a.start else None
    _, metrics = fit_boosted(original, train, test, keep=a.keep, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                             alpha=a.alpha, temperature=a.temperature, seed=a.seed, out=a.out, start=start,
                             clip=a.clip)
    print(json.dumps({"out": a.out, "train_seconds": metrics["train_seconds"], "history": metrics["history"]}))


if __name__ == "__main__":
    main()
