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


DEVICE_HELP = "auto (CUDA when available), cpu or cuda[:N]."


@main.command("fit-paths")
@click.option("--model", required=True,
              help="Reference model (mnist-cnn, cifar10-resnet20), a torchvision architecture name, or "
                   "package.module:function returning a nad_guard Classifier.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights file (safetensors or weights-only torch checkpoint) for the model.")
@click.option("--data", required=True, type=click.Choice(DATASETS))
@click.option("--data-root", type=click.Path(), default=None, help="Data folder (cifar10, imagefolder).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--schedule", type=click.Choice(["joint", "nad"]), default="joint", show_default=True,
              help="joint: all classes per batch; nad: NAD's one class at a time.")
@click.option("--layers", default=None, help="Comma-separated gate point module names (default: automatic).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--target-keep", type=float, default=0.25, show_default=True,
              help="Joint schedule: wanted share of channels kept per layer.")
@click.option("--beta", type=float, default=1.0, show_default=True, help="NAD schedule: sparsity coefficient.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint every epoch here and resume from it.")
def fit_paths_cmd(model: str, weights: str | None, data: str, data_root: str | None, out: str, schedule: str,
                  layers: str | None, epochs: int | None, batch_size: int | None, lr: float | None,
                  target_keep: float, beta: float, device: str, seed: int, checkpoint_dir: str | None) -> None:
    """Learn every class's sub-architecture of a frozen classifier and write the path artifact.

    Runs under `torchrun --nproc_per_node N -m nad_guard.cli fit-paths ...` as well."""
    from training.paths import fit_and_save

    summary = fit_and_save(model, data, out, weights=weights, data_root=data_root, schedule=schedule,
                           layers=layers.split(",") if layers else None, epochs=epochs, batch_size=batch_size,
                           lr=lr, target_keep=target_keep, beta=beta, device=device, seed=seed,
                           checkpoint_dir=checkpoint_dir)
    if summary is not None:
        click.echo(json.dumps(summary))


@main.command("fit-detector")
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False),
              help="Path artifact from fit-paths; the guard is written into it.")
@click.option("--model", required=True, help="The classifier the paths were learned for (as in fit-paths).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--data", required=True, type=click.Choice(DATASETS))
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--suite", default="mnist", show_default=True, help="Attack suite: mnist, cifar10 or fast.")
@click.option("--attacks", default=None, help="Comma-separated attacks of the suite (default: all but the noise controls).")
@click.option("--method", type=click.Choice(["gboost", "logistic", "isoforest", "gaussian"]), default="gboost",
              show_default=True, help="gboost/logistic are trained on attacks; isoforest/gaussian on clean data only.")
@click.option("--encoding", type=click.Choice(["rich", "summary"]), default="rich", show_default=True)
@click.option("--fpr", type=float, default=0.05, show_default=True,
              help="False-positive rate on held-out clean data at the threshold.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
def fit_detector_cmd(artifact: str, model: str, weights: str | None, data: str, data_root: str | None, suite: str,
                     attacks: str | None, method: str, encoding: str, fpr: float, device: str,
                     seed: int) -> None:
    """Generate the suite's attacks, fit the detector and calibrate its threshold, then write it into the
    artifact. The test split is divided (seeded, stratified) into detector-fit 40%, calibration 20%
    (clean only: the threshold) and evaluation 40% (left untouched for `evaluate` and `audit`)."""
    from training.detector import build_guard

    info = build_guard(artifact, model, data, weights=weights, data_root=data_root, suite=suite,
                       attacks=attacks.split(",") if attacks else None, method=method, encoding=encoding,
                       fpr=fpr, device=device, seed=seed)
    click.echo(json.dumps(info))


@main.command("build-default")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write the guard (default: the package's bundled default_guard folder).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def build_default_cmd(out: str | None, device: str) -> None:
    """Rebuild the bundled default guard: MNIST reference CNN, joint paths on mnist5k, gradient-boosting
    detector on the mnist suite, threshold at 5% FPR."""
    from nad_guard.guard import DEFAULT_GUARD_DIR
    from training.detector import build_default

    click.echo(json.dumps(build_default(out or DEFAULT_GUARD_DIR, device=device)))


if __name__ == "__main__":
    main()
