"""Fitting the NND architecture encoder (:class:`nad_guard.encoder.ArchitectureEncoder`) of a frozen classifier.

The loss on a batch (docs/encoder.md says where each term departs from the paper):

    KL(softmax(original logits) || softmax(decoupled logits))                     fidelity
    + mi_weight * CE(aux(gate vector), original prediction)                       mutual information
    + sparsity * mean_l [kept share of l > target_keep] * mean soft gate of l     sparsity (hinge)
    + align_weight * mean_l MSE(gate_l, a_l / max_c a_l), a_l = pool(relu(output_l)) alignment

The mutual-information term is the variational (Barber-Agakov) lower bound
``I(g; y) >= H(y) - CE(q(y | g))`` with an auxiliary linear classifier ``q`` over the concatenated soft
gates and ``y`` the frozen classifier's prediction (the input's class attribute): minimising the CE
maximises the bound. The sparsity hinge is an L1 penalty on the soft gates, switched on per gate point
while its kept share (hard gates, over the global batch) is above ``target_keep``, as in ``training.paths``. The alignment pulls each
gate towards the layer's own (ungated, detached) pooled positive output scaled to ``[0, 1]`` per image.

Every epoch after the first ``soft_epochs`` (default 0: all of them) gates with the hard 0/1 gates in the
forward pass and the sigmoid's gradient in the backward (straight-through), so that the decoupled network
used for acceleration is the one trained. (Soft gates first were tried on the CIFAR-10 ResNet-20: gates of
about 0.7 on every block output compound through the residual stages, and the KL to the original softmax
was 2.3 nats after the first epoch; the hard gates start exactly at the original network.)
Adam on the control modules and the auxiliary classifier; the classifier is frozen throughout.

Seeded (``seed``: the modules' initialisation and the batch order, from ``(seed, epoch)``), resumable
(``checkpoint_dir``: state after every epoch; a rerun with the same settings resumes and ends where an
uninterrupted run ends; a checkpoint from other settings is refused), and distributed like
``training.paths`` (``torchrun``: each rank takes ``batch[rank::N]``, losses normalised by global counts,
gradients summed over ranks; see :mod:`training.distributed`).

Command line (also under ``torchrun``)::

    python -m training.encoder --artifact bench/results/guard_cifar10-resnet20 --data cifar10 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nad_guard.data import ImageSet, load_dataset
from nad_guard.encoder import ArchitectureEncoder
from nad_guard.guard import artifact_classifier, resolve_guard_dir
from nad_guard.models import Classifier
from nad_guard.paths import read_meta
from training.distributed import Ranks, load_checkpoint, permutation, save_checkpoint, session
from training.paths import sample_training_set

CHECKPOINT_FILE = "encoder-checkpoint.pt"


def _originals(classifier: Classifier, data: ImageSet, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([classifier(x.to(device)) for x, _ in data.batches(batch_size)])


def _loss(enc: ArchitectureEncoder, x: torch.Tensor, orig: torch.Tensor, mode: str, n_batch: int, ranks: Ranks,
          weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's share of the global batch's loss, and its four terms (summed over the shard's rows)."""
    logits, gates, extra = enc(x, mode, keep_outputs=True)
    probs, outs = extra["probs"], extra["outputs"]
    p = orig.softmax(1)
    kl = (p * (orig.log_softmax(1) - logits.log_softmax(1))).sum()
    ce = F.cross_entropy(enc.aux(torch.cat(probs, 1)), orig.argmax(1), reduction="sum")
    with torch.no_grad():  # the hinge's switch: the layer's kept share (gates as used) over the global batch
        means = ranks.sum_(torch.stack([g.detach().sum() / g.shape[1] for g in gates])) / n_batch
        on = (means > weights["target_keep"]).to(logits.dtype)
    sparse = sum(on[i] * q.mean(1).sum() for i, q in enumerate(probs)) / len(probs)
    align = sum(((q - (o / o.amax(1, keepdim=True).clamp_min(1e-8)).detach()) ** 2).mean(1).sum()
                for q, o in zip(probs, outs)) / len(probs)
    total = (kl + weights["mi_weight"] * ce + weights["sparsity"] * sparse + weights["align_weight"] * align) / n_batch
    return total, torch.stack([kl, ce, sparse, align]).detach()


def _load_checkpoint(directory: str | Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    return load_checkpoint(directory, CHECKPOINT_FILE, config)


def _save_checkpoint(directory: str | Path | None, state: dict[str, Any], ranks: Any) -> None:
    save_checkpoint(directory, CHECKPOINT_FILE, state, ranks)


@torch.no_grad()
def evaluate_encoder(enc: ArchitectureEncoder, data: ImageSet, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of the original and the hard-gated (decoupled) network on ``data``, their agreement
    (fidelity), the hard gates' kept share per gate point, and the mutual-information bound in nats."""
    n, right_o, right_h, agree, ce = 0, 0, 0, 0, 0.0
    kept = torch.zeros(len(enc.names), dtype=torch.float64)
    counts = torch.zeros(enc.classifier.num_classes, dtype=torch.float64)
    dev = enc.class_means.device
    for x, y in data.batches(batch_size):
        x, y = x.to(dev), y.to(dev)
        o = enc.classifier(x).argmax(1)
        logits, gates, _ = enc(x, "hard")
        _, soft, _ = enc(x, "soft")
        h = logits.argmax(1)
        n += len(y)
        right_o, right_h, agree = right_o + int((o == y).sum()), right_h + int((h == y).sum()), agree + int((h == o).sum())
        kept += torch.stack([g.sum() / g.shape[1] for g in gates]).double().cpu()
        ce += float(F.cross_entropy(enc.aux(torch.cat(soft, 1)), o, reduction="sum"))
        counts += torch.bincount(o.cpu(), minlength=len(counts)).double()
    prior = counts / counts.sum()
    entropy = float(-(prior[prior > 0] * prior[prior > 0].log()).sum())
    return {"images": n, "accuracy_original": right_o / n, "accuracy_decoupled": right_h / n,
            "fidelity": agree / n, "kept_fraction": [round(float(k) / n, 4) for k in kept],
            "kept_fraction_mean": float(kept.sum() / n / len(enc.names)),
            "mi_bound_nats": entropy - ce / n, "prediction_entropy_nats": entropy}


def fit_encoder(classifier: Classifier, train_set: ImageSet, test_set: ImageSet | None = None, *,
                layers: Sequence[str] | None = None, epochs: int = 4, soft_epochs: int = 0, batch_size: int = 64,
                lr: float = 3e-3, hidden: int | None = None, mi_weight: float = 0.5, sparsity: float = 0.5,
                target_keep: float = 0.6, align_weight: float = 0.1, init_logit: float = 1.0,
                device: str = "auto", seed: int = 0, checkpoint_dir: str | Path | None = None,
                progress: bool = True) -> tuple[ArchitectureEncoder, dict[str, Any]]:
    """Fit the encoder (loss above) on ``train_set``; returns it (on CPU, ``class_means`` set from the
    training images by the original prediction) and the metrics (history, time, and
    :func:`evaluate_encoder` on ``test_set`` when given)."""
    if not 0 <= soft_epochs <= epochs:
        raise ValueError(f"soft_epochs must lie in [0, epochs], got {soft_epochs}")
    config = {"layers": list(layers) if layers else None, "epochs": epochs, "soft_epochs": soft_epochs,
              "batch_size": batch_size, "lr": lr, "hidden": hidden, "mi_weight": mi_weight, "sparsity": sparsity,
              "target_keep": target_keep, "align_weight": align_weight, "init_logit": init_logit, "seed": seed,
              "train_set": train_set.name, "train_images": len(train_set)}
    weights = {k: float(config[k]) for k in ("mi_weight", "sparsity", "target_keep", "align_weight")}
    t0 = time.time()
    with session(classifier, device) as (ranks, dev), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = ArchitectureEncoder(classifier, layers, hidden=hidden, init_logit=init_logit).to(dev)
        config["layers"] = enc.names
        opt = torch.optim.Adam(enc.parameters(), lr=lr)
        epoch, history = 0, []
        state = _load_checkpoint(checkpoint_dir, config)
        if state is not None:
            enc.load_state_dict(state["encoder"])
            opt.load_state_dict(state["optimizer"])
            epoch, history = state["epoch"], state["history"]
        orig = _originals(classifier, train_set, dev)
        n = len(train_set)
        bar = tqdm(total=epochs, initial=epoch, desc="fit-encoder", disable=not progress or ranks.rank != 0)
        while epoch < epochs:
            mode = "soft" if epoch < soft_epochs else "hard"
            perm, totals = permutation(n, seed, epoch), torch.zeros(5, dtype=torch.float64)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                local = ranks.shard(idx)
                x = train_set.images[local].float().div_(255.0).to(dev)
                opt.zero_grad(set_to_none=False)
                loss, terms = _loss(enc, x, orig[local.to(orig.device)], mode, len(idx), ranks, weights)
                loss.backward()
                for p in enc.parameters():
                    if p.grad is not None:
                        ranks.sum_(p.grad)
                opt.step()
                totals += torch.cat([terms.double().cpu(), torch.tensor([float(len(local))], dtype=torch.float64)])
            totals = ranks.sum_(totals.to(dev)).cpu()
            row = {k: totals[i].item() / totals[4].item() for i, k in enumerate(("kl", "aux_ce", "sparsity", "align"))}
            history.append({"epoch": epoch + 1, "gates": mode, **row})
            epoch += 1
            bar.set_postfix(kl=f"{row['kl']:.3f}", gate=f"{row['sparsity']:.2f}")
            bar.update(1)
            _save_checkpoint(checkpoint_dir, {"config": config, "epoch": epoch, "encoder": enc.state_dict(),
                                              "optimizer": opt.state_dict(), "history": history}, ranks)
        bar.close()
        enc.eval()
        with torch.no_grad():
            sums = torch.zeros_like(enc.class_means)
            counts = torch.zeros(classifier.num_classes, device=dev)
            for s in range(0, n, 256):
                _, v = enc.encode(train_set.float(s, s + 256).to(dev), "soft")
                k = orig[s:s + 256].argmax(1)
                sums.index_add_(0, k, v)
                counts += torch.bincount(k, minlength=len(counts)).float()
            enc.class_means.copy_(sums / counts.clamp_min(1)[:, None])
        metrics: dict[str, Any] = {"train_seconds": round(time.time() - t0, 1), "history": history,
                                   "world_size": ranks.world}
        if test_set is not None:
            metrics["test"] = evaluate_encoder(enc, test_set)
        enc.training_meta, enc.metrics_meta = config, metrics
        return enc.cpu(), metrics


def fit_and_save(artifact: str | Path, data: str, *, out: str | Path | None = None, data_root: str | None = None,
                 layers: Sequence[str] | None = None,
                 max_images: int | None = None, test_images: int | None = 2000, device: str = "auto",
                 seed: int = 0, checkpoint_dir: str | Path | None = None, progress: bool = True,
                 **options: Any) -> dict[str, Any] | None:
    """Fit the encoder for the guard or path artifact ``artifact`` (``"default"``: the bundled guard) at its gate
    points, on ``data`` (``max_images``: a seeded stratified sample), and save it into ``out`` (default: the
    artifact directory). ``layers``: other gate points than the artifact's (e.g. a ResNet's inner channels for
    acceleration; the detection features then have no mask columns). ``test_images``: how many test images (a seeded sample) measure it. ``options``: the
    loss and schedule settings of :func:`fit_encoder`. Returns a summary on rank 0, else ``None``."""
    path = resolve_guard_dir(artifact)
    clf = artifact_classifier(path)
    layers = list(layers) if layers else [str(d["name"]) for d in read_meta(path)["layers"]]
    train, test = load_dataset(data, data_root)
    train = sample_training_set(train, max_images, seed)
    if test_images is not None and test_images < len(test):
        test = test.subset(permutation(len(test), seed, -1)[:test_images], f"{test.name}[{test_images}]")
    enc, metrics = fit_encoder(clf, train, test, layers=layers, device=device, seed=seed,
                               checkpoint_dir=checkpoint_dir, progress=progress, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    target = Path(out) if out is not None else path
    enc.save(target, training=enc.training_meta | {"artifact": Path(path).name, "data": data}, metrics=metrics)
    return {"out": str(target), "train_images": len(train), "train_seconds": metrics["train_seconds"],
            **{k: v for k, v in (metrics.get("test") or {}).items() if k != "kept_fraction"}}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-root")
    ap.add_argument("--out")
    ap.add_argument("--layers", type=lambda v: v.split(","))
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--test-images", type=int, default=2000)
    for name, kind in (("epochs", int), ("soft-epochs", int), ("batch-size", int), ("lr", float), ("hidden", int),
                       ("mi-weight", float), ("sparsity", float), ("target-keep", float), ("align-weight", float)):
        ap.add_argument(f"--{name}", type=kind)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--no-progress", action="store_true")
    a = vars(ap.parse_args(argv))
    fixed = ("artifact", "data", "data_root", "out", "layers", "max_images", "test_images", "device", "seed", "checkpoint_dir")
    options = {k: v for k, v in a.items() if k not in fixed + ("no_progress",) and v is not None}
    summary = fit_and_save(**{k: a[k] for k in fixed}, progress=not a["no_progress"], **options)
    if summary is not None:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
