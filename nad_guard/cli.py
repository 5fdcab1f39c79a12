"""The ``nad-guard`` command line (click)."""

from __future__ import annotations

import json
import time

import click

from nad_guard.data import DATASETS


class _Group(click.Group):
    """Turns user errors (bad paths, bad data, bad options) into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nad-guard")
def main() -> None:
    """nad-guard: a trust layer for image classifiers."""


@main.command("train-reference")
@click.argument("name", type=click.Choice(["mnist-cnn", "cifar10-resnet20"]))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for <name>.safetensors and <name>.json (default: the package's weights folder).")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epoch count.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--data-root", type=click.Path(), default=None,
              help="CIFAR-10 folder (default: $NAD_GUARD_CIFAR10 or ../shared/data/cifar10).")
def train_reference_cmd(name: str, out_dir: str | None, epochs: int | None, seed: int, device: str,
                        data_root: str | None) -> None:
    """Train a reference classifier (mnist-cnn on mnist5k, cifar10-resnet20 on CIFAR-10) and write its
    weights and a JSON training record."""
    from nad_guard.models import WEIGHTS_DIR
    from training.classifier import train_reference

    rec = train_reference(name, out_dir or WEIGHTS_DIR, device=device, epochs=epochs, seed=seed,
                          data_root=data_root)
    click.echo(f"{name}: test accuracy {rec['test_accuracy']:.4f} on {rec['test_images']} images "
               f"after {rec['train_seconds']:.0f} s")


@main.command()
@click.option("--model", "model_name", default="mnist-cnn", show_default=True,
              type=click.Choice(["mnist-cnn", "cifar10-resnet20"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def quickstart(model_name: str, device: str) -> None:
    """Load a committed reference classifier and print its test accuracy."""
    from nad_guard.data import load_dataset
    from nad_guard.models import accuracy, load_reference, reference_record, resolve_device

    dev = resolve_device(device)
    model = load_reference(model_name)
    data = reference_record(model_name)["data"]
    t0 = time.time()
    _, test = load_dataset(data)
    acc = accuracy(model, test, device=dev)
    click.echo(json.dumps({"model": model_name, "data": data, "test_images": len(test), "test_accuracy": acc,
                           "device": str(dev), "seconds": round(time.time() - t0, 2)}))


@main.command("data-info")
@click.argument("name", type=click.Choice(DATASETS))
@click.option("--root", type=click.Path(), default=None, help="Data folder (cifar10, imagefolder).")
def data_info(name: str, root: str | None) -> None:
    """Print sizes, shapes and class counts of a data set's splits."""
    from nad_guard.data import load_dataset

    for part in load_dataset(name, root):
        counts = part.labels.bincount(minlength=part.num_classes).tolist()
        click.echo(json.dumps({"split": part.name, "images": len(part), "shape": list(part.shape),
                               "classes": part.classes, "per_class": counts}))


if __name__ == "__main__":
    main()
