"""The recipe that trains the reference classifiers.

SGD with Nesterov momentum, a one-cycle learning-rate schedule, label smoothing, and (for CIFAR-10)
random crops with 4-pixel padding plus horizontal flips, done batch-wise on tensors. Seeded.
On CPUs with bf16 support (AMX / AVX-512 BF16) the forward and backward run under bf16 autocast,
which is several times faster there; weights and the optimiser stay in fp32. Training runs in the
channels-last memory format (7% faster per ResNet-20 step on a 2-core AVX-512 BF16 CPU); the weights
are returned to the default format afterwards.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nad_guard.data import ImageSet, load_dataset
from nad_guard.models import REFERENCE_MODELS, WEIGHTS_DIR, Classifier, accuracy, load_reference, resolve_device


@dataclass
class Recipe:
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    crop_pad: int = 4
    flip: bool = True
    seed: int = 0


RECIPES = {
    "mnist-cnn": ("mnist5k", Recipe(epochs=12, batch_size=64, lr=0.05, crop_pad=2, flip=False)),
    "cifar10-resnet20": ("cifar10", Recipe(epochs=45, batch_size=128, lr=0.2)),
}


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip for a ``(N, C, H, W)`` batch."""
    n, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None])  # (N, H)
        cols = (dx[:, None] + torch.arange(w)[None])  # (N, W)
        x = xp[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def _autocast(device: torch.device) -> torch.autocast:
    bf16 = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train_classifier(model: Classifier, train: ImageSet, recipe: Recipe, device: torch.device,
                     test: ImageSet | None = None, progress: bool = True, eval_every: int = 5) -> dict:
    """Train ``model.net`` in place; returns a history dict. ``model`` stays frozen afterwards."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    net = model.net.to(device).to(memory_format=torch.channels_last)
    model.to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    history = []
    for epoch in range(recipe.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        t0, total, seen = time.time(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress,
                   leave=False)
        for i in bar:
            idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            x = train.images[idx].float().div_(255.0)
            x = augment(x, recipe.crop_pad, recipe.flip, gen).to(device).contiguous(memory_format=torch.channels_last)
            y = train.labels[idx].to(device)
            with _autocast(device):
                loss = F.cross_entropy(net(model.normalize(x)), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}")
        net.eval()
        rec = {"epoch": epoch + 1, "loss": total / seen, "seconds": time.time() - t0}
        if test is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == recipe.epochs):
            rec["test_accuracy"] = accuracy(model, test, device=device)
        history.append(rec)
        if progress:
            tqdm.write(json.dumps(rec))
    net.to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"history": history}


def versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torchvision

    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}


def train_reference(name: str, out_dir: str | Path = WEIGHTS_DIR, device: str = "auto", epochs: int | None = None,
                    seed: int = 0, data_root: str | Path | None = None, progress: bool = True,
                    init: str | Path | None = None, lr: float | None = None,
                    label_smoothing: float | None = None) -> dict:
    """Train a reference model and write ``<name>.safetensors`` and ``<name>.json`` into ``out_dir``.

    ``init``: start from these weights (fine-tuning; the record keeps the earlier run's record under
    ``"init"``); ``lr``, ``label_smoothing``: override the recipe's peak learning rate and label smoothing."""
    from safetensors.torch import save_file

    if name not in RECIPES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(RECIPES)}")
    data_name, recipe = RECIPES[name]
    recipe = Recipe(**{**asdict(recipe), "seed": seed, **({"epochs": epochs} if epochs else {}),
                       **({"lr": lr} if lr else {}),
                       **({"label_smoothing": label_smoothing} if label_smoothing is not None else {})})
    dev = resolve_device(device)
    train, test = load_dataset(data_name, data_root)
    model = REFERENCE_MODELS[name](train.classes)
    init_record = None
    if init is not None:
        model = load_reference(name, init)
        rec_path = Path(init).with_suffix(".json")
        init_record = json.loads(rec_path.read_text()) if rec_path.is_file() else {"weights": str(init)}
    t0 = time.time()
    hist = train_classifier(model, train, recipe, dev, test=test, progress=progress)
    seconds = time.time() - t0
    model.cpu()
    acc = accuracy(model, test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out / f"{name}.safetensors"))
    record = {
        "model": name, "data": data_name, "train_images": len(train), "test_images": len(test),
        "test_accuracy": acc, "recipe": asdict(recipe), "device": str(dev), "train_seconds": round(seconds, 1),
        "command": " ".join(["nad-guard", "train-reference", name, "--seed", str(seed)]
                            + (["--epochs", str(epochs)] if epochs else []) + (["--lr", str(lr)] if lr else [])
                            + (["--label-smoothing", str(label_smoothing)] if label_smoothing is not None else [])
                            + (["--init", str(init)] if init else [])),
        "init": init_record,
        "versions": versions(), "history": hist["history"],
        "input_spec": model.spec.to_dict(),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
