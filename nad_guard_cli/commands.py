"""The ``nad-guard`` command line (click).

Each command imports what it needs when it runs, so that ``nad-guard --help`` and a mistyped option
answer at once instead of after importing torch, torchattacks and matplotlib.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import click

from nad_guard.data import DATASETS


class _Group(click.Group):
    """Turns user errors (bad paths, bad data, bad options) into a one-line message and exit code 1, and
    says a ``ModelRecordWarning`` (--model other than the recorded classifier) and a ``SampleSizeNotice``
    (--max-images above the split's size) as one line on stderr."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if category.__name__ == "ModelRecordWarning":  # nad_guard.guard's (not imported: --help stays fast)
                    click.secho(f"WARNING: {message}", err=True, fg="yellow")
                elif category.__name__ == "SampleSizeNotice":  # nad_guard.data's: --max-images above the split
                    click.echo(f"NOTE: {message}", err=True)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
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
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from these weights (fine-tuning); their JSON record is kept in the new one.")
@click.option("--lr", type=float, default=None, help="Override the recipe's peak learning rate.")
@click.option("--label-smoothing", type=float, default=None, help="Override the recipe's label smoothing.")
def train_reference_cmd(name: str, out_dir: str | None, epochs: int | None, seed: int, device: str,
                        data_root: str | None, init: str | None, lr: float | None,
                        label_smoothing: float | None) -> None:
    """Train a reference classifier (mnist-cnn on mnist5k, cifar10-resnet20 on CIFAR-10) and write its
    weights and a JSON training record."""
    from nad_guard.models import WEIGHTS_DIR
    from training.classifier import train_reference

    rec = train_reference(name, out_dir or WEIGHTS_DIR, device=device, epochs=epochs, seed=seed,
                          data_root=data_root, init=init, lr=lr, label_smoothing=label_smoothing)
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
MODEL_HELP = ("The classifier: a reference model (mnist-cnn, cifar10-resnet20), a torchvision architecture "
              "(resnet18, mobilenet_v2, ...), package.module:function returning a nad_guard Classifier (the folder "
              "that holds the module must be on PYTHONPATH), or the path of an exported program (.pt2) or "
              "TorchScript file (the data set gives its classes and image size).")


def _channel_values(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise click.BadParameter(f"comma-separated numbers, one per channel (or one for all), not {value!r}")
    return values


def model_options(required: bool):
    """``--model``, ``--weights``, ``--mean`` and ``--std``, the same in fit-paths, fit-detector, evaluate
    and audit (see nad_guard.model_names.build_classifier). fit-paths requires --model and records it in the
    artifact; the other commands rebuild the recorded classifier when --model is left out."""
    later = ("" if required else " Default: the classifier the artifact records (fit-paths records it, with its "
             "weights); a different one is used with a warning, and its weights must still be the artifact's.")
    options = [
        click.option("--model", required=required, default=None, help=MODEL_HELP + later),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Weights file (safetensors or weights-only torch checkpoint) that replaces the model's."),
        click.option("--mean", default=None, callback=_channel_values,
                     help="Per-channel mean, comma-separated (e.g. 0.5,0.5,0.5), for torchvision models (default: "
                          "the safetensors weights' own 'mean' metadata, else ImageNet's) and .pt2/TorchScript "
                          "files (default: none, i.e. 0: the graph gets [0, 1] pixels)."),
        click.option("--std", default=None, callback=_channel_values,
                     help="Per-channel standard deviation, as --mean (defaults: the weights' 'std' metadata, else "
                          "ImageNet's; 1 for .pt2/TorchScript files)."),
    ]

    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


def _artifact_options(artifact_help: str):
    """The options fit-detector and evaluate share: the path artifact, its classifier, data and attacks."""
    options = [
        click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False), help=artifact_help),
        model_options(required=False),
        click.option("--data", required=True, type=click.Choice(DATASETS)),
        click.option("--data-root", type=click.Path(), default=None),
        click.option("--suite", default="mnist", show_default=True,
                     help="Attack suite: mnist, cifar10, fast or lee2018 (Lee et al. 2018's settings, docs/lee2018.md)."),
        click.option("--attacks", default=None,
                     help="Comma-separated attacks of the suite (default: all but the noise controls)."),
    ]

    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


@main.command("fit-paths")
@model_options(required=True)
@click.option("--data", required=True, type=click.Choice(DATASETS))
@click.option("--data-root", type=click.Path(), default=None, help="Data folder (cifar10, imagefolder).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--schedule", type=click.Choice(["joint", "nad"]), default="joint", show_default=True,
              help="joint: all classes per batch; nad: NAD's one class at a time.")
@click.option("--layers", default=None,
              help="Comma-separated gate point module names (default: automatic; a .pt2 model needs them named).")
@click.option("--epochs", type=int, default=None,
              help="Passes over the training images (default: joint 10, NAD 21 per class; cost above).")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None,
              help="Bound on training while the masks are degenerate after --epochs (a gate point keeping every "
                   "channel or none, a class subnetwork below 95% on its images): one more epoch at a time up to "
                   "this, then an error saying what to change. Default: 2x --epochs.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Learn from a seeded (--seed), stratified sample of this many training images.")
@click.option("--no-mask-check", is_flag=True, default=False,
              help="Save the masks after --epochs even if they are degenerate (for inspection; `nad-guard check` "
                   "still reports them).")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--target-keep", type=float, default=0.25, show_default=True,
              help="Joint schedule: wanted share of channels kept per layer.")
@click.option("--hard-epochs", type=int, default=1, show_default=True,
              help="Joint schedule: last epochs trained through the binary masks (straight-through).")
@click.option("--beta", type=float, default=1.0, show_default=True, help="NAD schedule: sparsity coefficient.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint every epoch here and resume from it.")
def fit_paths_cmd(model: str, weights: str | None, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                  data: str, data_root: str | None, out: str, schedule: str,
                  layers: str | None, epochs: int | None, max_epochs: int | None, max_images: int | None,
                  no_mask_check: bool,
                  batch_size: int | None, lr: float | None,
                  target_keep: float, hard_epochs: int, beta: float, device: str, seed: int,
                  checkpoint_dir: str | None) -> None:
    """Learn every class's sub-architecture of a frozen classifier and write the path artifact, with the
    classifier's weights and how to rebuild it (--model), so later commands need only the directory.

    \b
    Defaults: joint schedule 10 epochs (batch 128, Adam lr 0.05, 25% of channels kept); NAD schedule
    21 epochs per class (batch 16). Measured cost (bench/results/paths_summary.md, 2-core CPU):
      MNIST CNN, mnist5k's 4,000 images: joint 10 epochs 443 s (the bundled guard);
        NAD 21 epochs 218 CPU-s (1 thread).
      CIFAR-10 ResNet-20, all 50,000 images: joint 2 epochs (batch 32) 736 s on 1 thread (the committed
        CIFAR-10 guard); joint 10 epochs: not measured; NAD: not measured (about 102 CPU-min
        extrapolated from 2,500 images).
    Cost grows with images x epochs; --max-images samples the training set.

    After training the masks are checked; degenerate masks are trained on up to --max-epochs and then
    refused with an error naming the gate point or class and what to change (docs/paths.md).
    For several processes use `torchrun --nproc_per_node N -m training.paths` with the same options."""
    from training.paths import fit_and_save

    summary = fit_and_save(model, data, out, weights=weights, mean=mean, std=std, data_root=data_root,
                           schedule=schedule,
                           layers=layers.split(",") if layers else None, epochs=epochs, batch_size=batch_size,
                           lr=lr, target_keep=target_keep, hard_epochs=hard_epochs, beta=beta, device=device, seed=seed,
                           checkpoint_dir=checkpoint_dir, max_images=max_images, max_epochs=max_epochs,
                           check_masks=not no_mask_check)
    if summary is not None:
        click.echo(json.dumps(summary))


@main.command("fit-encoder")
@click.option("--artifact", required=True, help="Guard or path artifact directory (or 'default': the bundled guard); "
              "the encoder gates its gate points.")
@click.option("--data", required=True, type=click.Choice(DATASETS))
@click.option("--data-root", type=click.Path(), default=None, help="Data folder (cifar10, imagefolder).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for encoder.safetensors and encoder.json (default: the artifact directory).")
@click.option("--layers", default=None,
              help="Comma-separated gate points (default: the artifact's). E.g. a CIFAR ResNet's inner channels "
                   "layer1.0.bn1,...: closing those costs less accuracy than closing block outputs.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Learn from a seeded (--seed), stratified sample of this many training images.")
@click.option("--test-images", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Seeded sample of test images that measures the fitted encoder.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--soft-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="First epochs trained with the soft (sigmoid) gates; the rest use the hard 0/1 gates "
                   "(straight-through).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam learning rate.")
@click.option("--mi-weight", type=float, default=0.5, show_default=True,
              help="Weight of the mutual-information term (auxiliary-classifier bound).")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Weight of the sparsity hinge.")
@click.option("--target-keep", type=float, default=0.6, show_default=True,
              help="Share of channels per gate point above which the sparsity term acts.")
@click.option("--align-weight", type=float, default=0.1, show_default=True,
              help="Weight of the alignment of gates to the layers' pooled outputs.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint every epoch here and resume from it.")
def fit_encoder_cmd(artifact: str, data: str, data_root: str | None, out: str | None, layers: str | None,
                    max_images: int | None,
                    test_images: int, epochs: int, soft_epochs: int, batch_size: int, lr: float, mi_weight: float,
                    sparsity: float, target_keep: float, align_weight: float, device: str, seed: int,
                    checkpoint_dir: str | None) -> None:
    """Fit the NND architecture encoder (Li et al., ECCV 2020) of a guard's frozen classifier: per-input
    gates at the guard's gate points, from each layer's input (docs/encoder.md).

    \b
    Loss: KL to the classifier's softmax + mutual-information bound (auxiliary classifier of the predicted
    class from the gates) + sparsity hinge + alignment of gates to the layers' pooled outputs.
    Measured cost (2 shared cores, 1 thread; bench/results/encoder_*): see the README there.
    For several processes use `torchrun --nproc_per_node N -m training.encoder` with the same options."""
    from training.encoder import fit_and_save

    summary = fit_and_save(artifact, data, out=out, data_root=data_root, layers=layers.split(",") if layers else None,
                           max_images=max_images,
                           test_images=test_images, device=device, seed=seed, checkpoint_dir=checkpoint_dir,
                           epochs=epochs, soft_epochs=soft_epochs, batch_size=batch_size, lr=lr, mi_weight=mi_weight,
                           sparsity=sparsity, target_keep=target_keep, align_weight=align_weight)
    if summary is not None:
        click.echo(json.dumps(summary))


@main.command("fit-detector")
@_artifact_options("Path artifact from fit-paths; the guard is written into it.")
@click.option("--method", type=click.Choice(["logistic", "gboost", "knn", "gaussian", "isoforest"]), default="logistic",
              show_default=True, help="logistic/gboost are trained on attacks (and mispredictions); knn/gaussian/"
                                      "isoforest on clean data only.")
@click.option("--encoding", type=click.Choice(["summary", "rich", "full"]), default="rich", show_default=True,
              help="Detector input (see nad_guard.encoding): summary features, + class-score gaps, + the path itself.")
@click.option("--select", type=click.Choice(["fixed", "cv"]), default="fixed", show_default=True,
              help="cv: ignore --method/--encoding and take the best of logistic/gboost x rich/full by "
                   "3-fold cross-validated AUROC on the fit part (folds hold out whole attacks, or whole images "
                   "when there are fewer than 3 attacks and kinds of error).")
@click.option("--mispredictions/--no-mispredictions", default=True, show_default=True,
              help="With --attack-detector-only: also train a supervised detector on the fit part's natural "
                   "mispredictions (as suspicious; counted in the output's fit_mispredicted_trained_as_suspicious). "
                   "With an error detector they are its rows instead (error_detector.fit_mispredicted).")
@click.option("--error-detector/--attack-detector-only", default=True, show_default=True,
              help="Two questions, two detectors (nad_guard.errors): an attack detector (correct images vs attacks) "
                   "and an error detector (correct vs mispredicted images; MSP, DOCTOR, energy or a logistic "
                   "regression on them and the path features, chosen by cross-validation on the fit part), each "
                   "with its own p-value; --attack-detector-only builds the one detector of earlier guards.")
@click.option("--attack-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="With two detectors: the attack detector's share of --fpr (the error "
                                      "detector gets the rest; flagged if either p-value is within its share).")
@click.option("--probes", type=click.IntRange(min=0), default=0, show_default=True,
              help="K > 0: also fit the deep check's detector (nad_guard.deep): the same method and encoding on the "
                   "path features plus how they move under K small random perturbations of the input (one batched "
                   "pass of K + 1 rows an input), calibrated like the attack detector; the guard then also answers "
                   "in deep mode (Guard.run(deep=True), the service's ?probes=K). 0: single-pass only.")
@click.option("--max-images", type=int, default=None,
              help="Use a seeded stratified sample of this many test images (the same sample as evaluate's).")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="False-positive rate asked of the threshold on clean inputs (guaranteed on average over "
                   "calibration sets; the output gives the 95% bound for this one).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
def fit_detector_cmd(artifact: str, model: str | None, weights: str | None, mean: tuple[float, ...] | None,
                     std: tuple[float, ...] | None, data: str, data_root: str | None, suite: str, attacks: str | None,
                     method: str, encoding: str, select: str, mispredictions: bool, error_detector: bool,
                     attack_share: float, probes: int, max_images: int | None,
                     fpr: float, device: str, seed: int) -> None:
    """Generate the suite's attacks, fit the detector and calibrate its threshold, then write it into the
    artifact. The test split is divided (seeded, stratified) into detector-fit 40%, calibration 20%
    (clean only: the threshold) and evaluation 40% (left untouched for `evaluate` and `audit`); the guard's
    meta.json records which images each part holds. The threshold is the ceil((n+1)(1-FPR))-th smallest of the
    n clean calibration scores (split conformal): the output gives n and the false-positive bounds, and warns
    when n is too small for a tight bound (it refuses when n < ceil(1/FPR) - 1)."""
    from training.detector import build_guard

    with _calibration_warnings():
        info = build_guard(artifact, model, data, weights=weights, mean=mean, std=std, data_root=data_root, suite=suite,
                           attacks=attacks.split(",") if attacks else None, method=method, encoding=encoding,
                           select=select, mispredictions=mispredictions, fpr=fpr, max_images=max_images,
                           device=device, seed=seed, error_detector=error_detector, attack_share=attack_share,
                           probes=probes)
    _report_calibration(info["calibration"])
    _report_health(artifact)
    click.echo(json.dumps(info))


def _report_health(guard: str) -> None:
    """The health report's warnings that need no data (stderr), and where to read the whole report."""
    from nad_guard.health import static_report

    for w in static_report(guard)["warnings"]:
        if not w.startswith("small calibration set"):  # said by _report_calibration already
            click.secho(f"WARNING: {w}", err=True, fg="red", bold=True)
    click.echo(f"health report: nad-guard check {guard}", err=True)


@main.command("check")
@click.argument("guard", default="default")
@click.option("--data-root", type=click.Path(), default=None,
              help="Folder of the guard's data set (cifar10, imagefolder), to measure it on the images its detector "
                   "never saw.")
@click.option("--no-data", is_flag=True, help="Only what the guard directory records (no classifier, no images).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True, help="Exit with status 2 when there is any warning.")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
def check_cmd(guard: str, data_root: str | None, no_data: bool, as_json: bool, strict: bool, device: str) -> None:
    """Health report of a guard directory (or 'default'): gate points and the depth they cover, kept
    fraction per gate point, class subnetwork accuracy, calibration size and false-positive bounds, the
    detector's cross-validated AUROC per training attack, and, on the images the detector never saw (the
    evaluation part of its held-out split, from the provenance it records), the observed false-positive
    rate at the deployed threshold and the detector against MSP on mispredictions. Weak points are
    warned in words."""
    from nad_guard.health import format_report, health_report
    from nad_guard.models import resolve_device

    report = health_report(guard, data_root=data_root, measure=not no_data, device=str(resolve_device(device)))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if strict and report["warnings"]:
        raise SystemExit(2)


@contextlib.contextmanager
def _calibration_warnings():
    """Turn :class:`~nad_guard.calibration.CalibrationError` into a usage error and hold
    :class:`~nad_guard.calibration.CalibrationWarning` back for :func:`_report_calibration` (said once)."""
    from nad_guard.calibration import CalibrationError, CalibrationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        try:
            yield
        except CalibrationError as e:
            raise click.UsageError(str(e)) from e


def _report_calibration(cal: dict) -> None:
    """The calibration's size and false-positive bounds on stderr, and its warning, loudly."""
    from nad_guard.calibration import FPRGuarantee

    g = FPRGuarantee(**{k: v for k, v in cal.items() if k in FPRGuarantee.__dataclass_fields__})
    click.echo(f"calibration: {g.summary()}", err=True)
    if g.warning:
        click.secho(f"WARNING: {g.warning}", err=True, fg="red", bold=True)


@main.command("build-default")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write the guard (default: the package's bundled default_guard folder).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def build_default_cmd(out: str | None, device: str) -> None:
    """Rebuild the bundled default guard: MNIST reference CNN, joint paths on mnist5k, logistic detector
    on the 'rich' encoding trained on the mnist suite's attacks and the fit part's mispredictions, threshold
    at 5% FPR."""
    from nad_guard.guard import DEFAULT_GUARD_DIR
    from training.detector import build_default

    with _calibration_warnings():
        info = build_default(out or DEFAULT_GUARD_DIR, device=device)
    _report_calibration(info["detector"]["calibration"])
    click.echo(json.dumps(info))


@main.command("evaluate")
@_artifact_options("Path artifact from fit-paths (a detector in it is not used: each protocol fits its own).")
@click.option("--protocols", default="seen,unseen,fgsm-only,clean-only,mispredictions,deployed,adaptive",
              show_default=True,
              help="Comma-separated protocols.")
@click.option("--method", "methods", default="logistic,gboost", show_default=True,
              help="Supervised nad-guard detectors to fit; with --select fixed the first (with the first "
                   "encoding) is 'nad-guard'.")
@click.option("--encoding", "encodings", default="rich,full", show_default=True,
              help="Comma-separated detector encodings (see nad_guard.encoding).")
@click.option("--select", type=click.Choice(["fixed", "cv"]), default="fixed", show_default=True,
              help="Which method x encoding is 'nad-guard': fixed = the first of each; cv = per training task, "
                   "the best by cross-validated AUROC on the fit part (folds hold out whole attacks, or whole "
                   "images when the task trains on fewer attacks than folds).")
@click.option("--cv-folds", type=click.IntRange(min=2), default=3, show_default=True, help="Folds for --select cv.")
@click.option("--clean-method", "clean_methods", default="knn:summary,gaussian:rich,isoforest:rich", show_default=True,
              help="nad-guard's clean-only detectors, each METHOD or METHOD:ENCODING (the first --encoding when "
                   "omitted); the first is 'nad-guard' in the clean-only protocol.")
@click.option("--multipass-baselines", default="",
              help="Comma-separated multi-pass baselines to add as unsupervised rows: feature-squeezing (Xu et al. "
                   "2018, the paper's squeezers: 3-4 more forward passes per image), odds (Roth et al. 2019: "
                   "1 + 9 x --odds-samples more passes per image). None by default.")
@click.option("--odds-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Noise draws per noise setting of the odds baseline (the paper's 256).")
@click.option("--maha-noise", default="", show_default=True,
              help="Noise magnitudes (comma-separated, [0, 1] pixel units) of Lee et al.'s input pre-processing, "
                   "or 'lee' for theirs (0,0.01,0.005,0.002,0.0014,0.001,0.0005): adds the row "
                   "mahalanobis-lr[pre] to seen/unseen/fgsm-only (magnitude chosen by CV on the fit part; costs "
                   "per image and layer one forward-backward pass plus one forward pass per magnitude). Empty: off.")
@click.option("--noisy-negatives", default="",
              help="Comma-separated noise controls of the suite (noise-l2, noise-linf) counted as negatives, as "
                   "Lee et al. 2018 count their noisy images: in seen/unseen/fgsm-only they are generated on every "
                   "holdout part and join its clean images, as label 0 when the supervised detectors are fitted, "
                   "in the calibration part's thresholds and in every row's AUROC and TPR; never scored as attacks. "
                   "Empty: off.")
@click.option("--probes", type=click.IntRange(min=0), default=0, show_default=True,
              help="The deep check (nad_guard.probes): with K > 0 every protocol but adaptive also reports "
                   "'nad-guard[deep k=K]', nad-guard's detector on its row plus what moves under K probes; with "
                   "--multipass-baselines feature-squeezing also 'nad-guard[deep k=K+squeezing]', the same plus the "
                   "squeezers' distances.")
@click.option("--encoder", type=click.Path(exists=True, file_okay=False), default=None,
              help="A fitted NND encoder's directory (nad-guard fit-encoder): every protocol but deployed and "
                   "adaptive also reports 'nad-guard[+nnd-encoder]', nad-guard's detector on its row plus the "
                   "encoder's columns (docs/encoder.md; about one more forward pass per image).")
@click.option("--probe-transforms", default="noise,bits,smooth,shift", show_default=True,
              help="The probes' transforms, cycled over the K probes (noise, bits, smooth, shift).")
@click.option("--probe-sigma", type=float, default=0.01, show_default=True,
              help="Standard deviation of the Gaussian noise added to every probe (pixels in [0, 1]).")
@click.option("--probe-per-layer/--probe-layer-mean", default=True, show_default=True,
              help="Probe columns per gate point, or the per-gate-point shifts averaged over gate points first.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for results.md, results.json and roc_*.png.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--max-images", type=int, default=None, help="Use a seeded stratified sample of this many test images.")
@click.option("--train-images", type=int, default=5000, show_default=True,
              help="Training images for the baselines' unsupervised parts (Gaussians, kNN, LID reference).")
@click.option("--adaptive-images", type=int, default=200, show_default=True,
              help="Correctly classified evaluation images the adaptive protocol attacks.")
@click.option("--adaptive-steps", type=int, default=None,
              help="PGD steps of the adaptive attack (default: the suite's pgd steps).")
@click.option("--adaptive-eot", type=int, default=4, show_default=True,
              help="Draws of a random defence's randomness averaged per adaptive step (EOT).")
@click.option("--adaptive-eps-scales", default="0.125,0.25,0.5,1,2", show_default=True,
              help="The adaptive attack's budget grid, as multiples of the suite's pgd eps (which is always on it).")
@click.option("--adaptive-targets", default="nad-guard,mahalanobis-lr,msp,feature-squeezing", show_default=True,
              help="Defences the adaptive protocol attacks (nad_guard.evaluate.adaptive.TARGETS): nad-guard, "
                   "mahalanobis-lr, msp, feature-squeezing, undefended, and with --probes K the deep mode: "
                   "nad-guard-deep (the attacker knows the deployed probes), nad-guard-deep-eot (EOT over fresh ones).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Bounds memory; part of the attack cache key.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the intervals.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Attack cache (default: $NAD_GUARD_CACHE/attacks).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def evaluate_cmd(artifact: str, model: str | None, weights: str | None, mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None, data: str, data_root: str | None, suite: str, attacks: str | None,
                 protocols: str, methods: str, encodings: str, select: str, cv_folds: int,
                 clean_methods: str, multipass_baselines: str, odds_samples: int, maha_noise: str,
                 noisy_negatives: str, probes: int,
                 encoder: str | None, probe_transforms: str, probe_sigma: float, probe_per_layer: bool, out: str,
                 device: str, max_images: int | None, train_images: int, adaptive_images: int,
                 adaptive_steps: int | None, adaptive_eot: int, adaptive_eps_scales: str, adaptive_targets: str,
                 batch_size: int, bootstrap: int, seed: int, cache_dir: str | None, quiet: bool) -> None:
    """Judge nad-guard against MSP, Energy, Mahalanobis, LID and deep kNN (and, on request, feature squeezing
    and the Odds) under the honest protocols
    (seen, unseen, fgsm-only, clean-only, mispredictions, adaptive) on the test split's held-out parts,
    and write a Markdown table, a JSON file and ROC plots into --out."""
    from nad_guard.attacks import default_cache_dir
    from nad_guard.data import load_dataset
    from nad_guard.evaluate import EvalConfig, run_evaluation, write_outputs
    from nad_guard.guard import artifact_classifier
    from nad_guard.models import resolve_device
    from nad_guard.paths import PathModel, read_meta

    split = lambda v: [s.strip() for s in v.split(",") if s.strip()]  # noqa: E731
    m, e = split(methods), split(encodings)
    cfg = EvalConfig(suite=suite, attacks=split(attacks) if attacks else None, protocols=split(protocols),
                     methods=m, encodings=e, primary=(m[0], e[0]), select=select, cv_folds=cv_folds,
                     clean_methods=split(clean_methods),
                     multipass_baselines=split(multipass_baselines), odds_samples=odds_samples,
                     maha_noise=_maha_noise(maha_noise), noisy_negatives=split(noisy_negatives),
                     probes=probes, probe_transforms=split(probe_transforms), probe_sigma=probe_sigma,
                     probe_per_layer=probe_per_layer, encoder=encoder,
                     batch_size=batch_size, n_resamples=bootstrap, seed=seed, max_images=max_images,
                     train_images=train_images, adaptive_images=adaptive_images, adaptive_steps=adaptive_steps,
                     adaptive_eot=adaptive_eot, adaptive_eps_scales=[float(v) for v in split(adaptive_eps_scales)],
                     adaptive_targets=split(adaptive_targets),
                     device=str(resolve_device(device)), progress=not quiet)
    if cfg.noisy_negatives:
        from nad_guard.attacks import get_suite

        try:
            cfg.noisy_controls(get_suite(suite, seed=seed), cfg.attacks or [])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--noisy-negatives") from e
    train, test = load_dataset(data, data_root)
    paths = PathModel.load(artifact, artifact_classifier(artifact, model, weights, mean=mean, std=std,
                                                         class_names=train.classes, input_size=train.shape[1],
                                                         channels=train.shape[0]))
    detector_meta = read_meta(Path(artifact)).get("detector")
    result = run_evaluation(paths, train, test, cfg, cache_dir=cache_dir or default_cache_dir(),
                            log=lambda msg: click.echo(msg, err=True),
                            guard_provenance=(detector_meta.get("provenance") or {}) if detector_meta else None)
    if "guard" in result["provenance"]:
        click.echo(f"holdout parts vs the artifact's guard: {result['provenance']['guard']['note']}", err=True)
    files = write_outputs(result, out, command=_given_command("evaluate"))
    click.echo(json.dumps({"out": out, "seconds": result["seconds"], "summary": {
        p: {"nad_guard": s["nad_guard_mean_auroc"], "best_baseline": s["best_baseline"],
            "best_baseline_auroc": s["best_baseline_mean_auroc"]} for p, s in result["summary"].items()},
        "adaptive": {k: v["adaptive_evades"] for k, v in (result["adaptive"] or {}).get("detectors", {}).items()},
        "adaptive_budget_50": {k: v["budget_50"] for k, v in (result["adaptive"] or {}).get("detectors", {}).items()},
        "files": sorted(str(f) for f in files.values())}))


def _maha_noise(text: str) -> tuple[float, ...]:
    """``--maha-noise``: 'lee' for Lee et al.'s magnitudes, else comma-separated numbers >= 0."""
    from nad_guard.baselines.mahalanobis_pre import LEE_NOISE

    if text.strip().lower() == "lee":
        return LEE_NOISE
    try:
        mags = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected 'lee' or comma-separated numbers, got {text!r}", param_hint="--maha-noise")
    if any(m < 0 for m in mags):
        raise click.BadParameter("magnitudes must be >= 0", param_hint="--maha-noise")
    return mags


def _given_command(name: str) -> str:
    """The current command line as the user gave it (options at their defaults left out), with absolute
    paths made portable (:func:`nad_guard.runinfo.portable_arg`)."""
    import shlex

    from nad_guard.runinfo import portable_arg

    ctx = click.get_current_context()
    given = []
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if isinstance(param, click.Option) and param.is_flag:
            given += [flag] if value else []
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # --mean/--std
            given += [flag, shlex.quote(portable_arg(text))]
    return " ".join([f"nad-guard {name}", *given])


@main.command("audit")
@click.option("--artifact", default="default", show_default=True,
              help="Guard directory (from fit-detector), or 'default' for the bundled MNIST guard.")
@model_options(required=False)
@click.option("--data", type=click.Choice(DATASETS), default=None,
              help="Data set to audit (default: the one the guard's detector was fitted on).")
@click.option("--data-root", type=click.Path(), default=None, help="Data folder (cifar10, imagefolder).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--max-images", type=int, default=None, help="Audit a seeded stratified sample of this many images.")
@click.option("--attacks", "suite", default=None,
              help="Also audit adversarial examples of this attack suite (mnist, cifar10, fast), made on the "
                   "correctly classified images the detector never saw.")
@click.option("--attack-names", default=None,
              help="Comma-separated attacks of the suite (default: all but the noise controls).")
@click.option("--attack-images", type=int, default=None, help="Attack at most this many images (stratified sample).")
@click.option("--gallery", "gallery_size", type=int, default=24, show_default=True,
              help="How many of the least trusted inputs to show.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Images per forward pass (bounds memory; results do not depend on it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples and attacks.")
@click.option("--saliency-images", type=int, default=200, show_default=True,
              help="Correctly classified images of the subnetwork-explanation test (deletion metric); 0: skip it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Attack cache (default: $NAD_GUARD_CACHE/attacks).")
@click.option("--encoder", "encoder_dir", default=None,
              help="Directory of an NND architecture encoder of the guard's classifier (from fit-encoder): its "
                   "class-average gates are compared with the confusions next to the masks. Default: the guard "
                   "directory's encoder, if it has one; 'none': no encoder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Report folder: index.html, summary.json, samples.csv, explanations.json and PNG figures.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines.")
def audit_cmd(artifact: str, model: str | None, weights: str | None, mean: tuple[float, ...] | None,
              std: tuple[float, ...] | None, data: str | None, data_root: str | None, split: str,
              max_images: int | None,
              suite: str | None, attack_names: str | None, attack_images: int | None, gallery_size: int,
              device: str, batch_size: int, seed: int, saliency_images: int, cache_dir: str | None,
              encoder_dir: str | None, out: str, quiet: bool) -> None:
    """Audit a guard's mispredictions on a labelled data split and write a report a person reads:
    accuracy and confusions, each error's nearest sub-architecture and the rank of its true class, each
    error's path layer by layer and the filters that decided it, NAD's claims against chance (the path's
    nearest sub-architecture; the wrong class among the true class's most similar), similarity against
    confusion (for the masks and, given one, an NND encoder's class-average gates), per-layer divergence,
    the subnetwork-explanation claim (deletion metric), how well the trust score separates errors, and the
    least trusted inputs."""
    from nad_guard.attacks import default_cache_dir
    from nad_guard.audit import guard_data, load_audit_encoder, load_split, run_audit, write_report
    from nad_guard.guard import resolve_guard_dir
    from nad_guard.guard import Guard, artifact_classifier
    from nad_guard.models import resolve_device
    from nad_guard.runinfo import portable_path

    t0 = time.perf_counter()
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    dev = resolve_device(device)
    guard_dir = resolve_guard_dir(artifact)
    given = (artifact_classifier(guard_dir, model, weights, mean=mean, std=std)
             if (model, weights, mean, std) != (None,) * 4 else None)
    guard = Guard.load(guard_dir, device=str(dev), classifier=given)
    if data is None:
        data, _ = guard_data(guard)
        if data is None:
            raise click.UsageError(f"the guard in {guard_dir} does not record its data set: pass --data")
    images = load_split(data, split, data_root, guard)
    encoder, encoder_dir = load_audit_encoder(guard_dir, encoder_dir, guard)
    if encoder is not None:
        log(f"encoder from {portable_path(encoder_dir)}: gate points {', '.join(encoder.names)}")
    load_s = time.perf_counter() - t0
    names = [a.strip() for a in attack_names.split(",") if a.strip()] if attack_names else None
    if names and suite is None:
        raise click.UsageError("--attack-names needs --attacks SUITE")
    result = run_audit(guard, images, max_images=max_images, attacks=names, suite=suite, attack_images=attack_images,
                       batch_size=batch_size, gallery_size=gallery_size, device=dev,
                       cache_dir=cache_dir or default_cache_dir(), seed=seed, progress=not quiet,
                       saliency_images=saliency_images, encoder=encoder,
                       encoder_source=portable_path(encoder_dir) if encoder is not None else None,
                       source="default" if artifact == "default" else portable_path(guard_dir), log=log)
    files = write_report(result, out, command=_given_command("audit"), timings={"load_s": round(load_s, 3)})
    s = result.summary
    claim = s["nad_claim"]["groups"]["mispredictions"]
    sep = s["separation"]["rows"][0]
    click.echo(json.dumps({
        "out": out, "images": s["n_images"], "accuracy": s["accuracy"]["share"],
        "mispredictions": claim["n"], "path_nearest_true": claim["path_top1"]["share"],
        "path_top3_true": claim["path_top3"]["share"], "auroc_mispredictions": sep["auroc"],
        "caught": sep["caught"], "separation_basis": s["separation"]["basis"],
        "spearman_similarity_confusion": s["similarity_vs_confusion"]["errors"]["rho"],
        "nad_test_k1": (s["claims"]["sources"]["masks"]["nad_test"]["mispredictions"]["by_k"].get("1") or {}).get("share"),
        "nad_test_k3": (s["claims"]["sources"]["masks"]["nad_test"]["mispredictions"]["by_k"].get("3") or {}).get("share"),
        "class_path_sources": {name: {**{f"nad_test_k{k}": (d["nad_test"]["mispredictions"]["by_k"].get(k) or {})
                                         .get("share") for k in ("1", "3")},
                                      "spearman_similarity_confusion": d["similarity_vs_confusion"]["rho"]}
                               for name, d in s["claims"]["sources"].items()},
        "subnetwork_explanations": (s["claims"].get("subnetwork_explanations") or {}).get("verdict"),
        "detector_split": s["split"]["status"], "calibration": s["calibration"]["summary"],
        **({"calibration_warning": s["calibration"]["warning"]} if s["calibration"].get("warning") else {}),
        "seconds": round(time.perf_counter() - t0, 1), "report": str(files["index.html"])}))

if __name__ == "__main__":
    main()
