"""Train the outside-style CIFAR-10 VGG (``cifar_vgg.py``) and write ``cifar_vgg.safetensors`` and the
training record ``cifar_vgg.json`` beside it.

    PYTHONPATH=bench/outside_models .venv/bin/python bench/outside_models/train_cifar_vgg.py --epochs 40

The loop is nad-guard's own training recipe (``training.classifier.train_classifier``: SGD with
Nesterov momentum, one-cycle, crop and flip, bf16 autocast where the CPU has it), applied to a network
the project's gate discovery has never seen; the weights are the user's from then on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from cifar_vgg import HERE, cifar_vgg
from nad_guard.data import load_dataset
from nad_guard.models import accuracy, resolve_device
from nad_guard.runinfo import cpu_model
from training.classifier import Recipe, train_classifier, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args()
    dev = resolve_device(a.device)
    train, test = load_dataset("cifar10")
    model = cifar_vgg(weights=None)  # untrained
    recipe = Recipe(epochs=a.epochs, batch_size=128, lr=a.lr, label_smoothing=0.0, seed=a.seed)
    t0 = time.time()
    hist = train_classifier(model, train, recipe, dev, test=test, progress=False)
    seconds = time.time() - t0
    model.cpu()
    acc = accuracy(model, test)
    out = Path(a.out)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out / "cifar_vgg.safetensors"))
    record = {"model": "cifar-vgg (bench/outside_models/cifar_vgg.py)", "data": "cifar10", "train_images": len(train),
              "test_images": len(test), "test_accuracy": acc, "recipe": asdict(recipe), "device": str(dev),
              "train_seconds": round(seconds, 1),
              "parameters": sum(p.numel() for p in model.net.parameters()),
              "command": f"PYTHONPATH=bench/outside_models .venv/bin/python bench/outside_models/train_cifar_vgg.py "
                         f"--epochs {a.epochs} --lr {a.lr} --seed {a.seed}",
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_end": list(os.getloadavg())},
              "versions": {k: v for k, v in versions().items() if k != "platform"}, "history": hist["history"],
              "input_spec": model.spec.to_dict()}
    (out / "cifar_vgg.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"test_accuracy": acc, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
