"""What is audited: the guard directory (:func:`nad_guard.guard.resolve_guard_dir`), the data set and split its
detector was fitted on (:func:`guard_data`), a named split (:func:`load_split`), whether that data
fits the guard's classifier (:func:`check_fits`, :class:`AuditError`), and the NND encoder whose class paths the
claims compare with the masks' (:func:`load_audit_encoder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nad_guard.data import DATASETS, ImageSet
from nad_guard.guard import Guard


class AuditError(ValueError):
    """The audit's input does not fit: no images, or data the guard's classifier cannot take."""


# --------------------------------------------------------------------------- data

def load_split(name: str, split: str = "test", root: str | Path | None = None, guard: Guard | None = None
               ) -> ImageSet:
    """One split (``"test"`` or ``"train"``) of a named data set (see :mod:`nad_guard.data`); an
    ``imagefolder`` is converted to the guard's channels and size."""
    from nad_guard.data import load_cifar10, load_dataset

    if name not in DATASETS:
        raise AuditError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("test", "train"):
        raise AuditError(f"split must be 'test' or 'train', got {split!r}")
    if name == "cifar10":
        return load_cifar10(root, split)
    kw: dict[str, Any] = {}
    if name == "imagefolder" and guard is not None:
        spec = guard.classifier.spec
        kw = {"channels": spec.channels, "size": (spec.height, spec.width)}
    train, test = load_dataset(name, root, **kw)
    return test if split == "test" else train


def check_fits(guard: Guard, data: ImageSet) -> None:
    """Raise :class:`AuditError` naming what is wrong if ``data`` cannot be audited with ``guard``."""
    spec, clf = guard.classifier.spec, guard.classifier
    what = f"data set {data.name or 'given'}"
    if len(data) == 0:
        raise AuditError(f"{what} holds no images; expected labelled images of {spec.channels}x{spec.height}x"
                         f"{spec.width} for classes {clf.class_names[:10]}")
    if tuple(data.shape) != tuple(spec.shape):
        c, h, w = data.shape
        raise AuditError(f"{what} has {c}x{h}x{w} images (C x H x W); the guard's classifier {clf.name!r} takes "
                         f"{spec.channels}x{spec.height}x{spec.width}: audit it with data of that size")
    if data.num_classes != clf.num_classes or list(data.classes) != list(clf.class_names):
        raise AuditError(f"{what} has {data.num_classes} classes {list(data.classes)[:10]}; the guard's "
                         f"classifier {clf.name!r} has {clf.num_classes} classes {clf.class_names[:10]}: labels "
                         "must name the same classes in the same order")
    bad = (data.labels < 0) | (data.labels >= clf.num_classes)
    if bool(bad.any()):
        raise AuditError(f"{what} has labels outside 0..{clf.num_classes - 1}")


def guard_data(guard: Guard) -> tuple[str | None, str | None]:
    """``(data set, split)`` the guard's detector was fitted on, from its provenance record (or, for guards
    without one, the name of its fit set); ``None`` where unknown."""
    det = guard.meta.get("detector") or {}
    record = det.get("provenance")
    if isinstance(record, dict) and record.get("data") in DATASETS:
        return record["data"], record.get("split")
    fit_set = det.get("fit_set")
    if not isinstance(fit_set, str) or "/" not in fit_set:
        return None, None
    base = fit_set.split("[", 1)[0]
    name, _, split = base.partition("/")
    name = name.split(":", 1)[0]
    return (name if name in DATASETS else None), (split or None)


# --------------------------------------------------------------------------- encoder

def load_audit_encoder(guard_dir: str | Path, encoder_dir: str | Path | None, guard: Guard) -> tuple[Any, str | None]:
    """The NND architecture encoder (:class:`~nad_guard.encoder.ArchitectureEncoder`) of ``guard``'s classifier
    that the audit's claims use (``nad-guard audit --encoder``): from ``encoder_dir``; with ``None`` the guard
    directory's own (its ``encoder.safetensors``) if it has one; ``"none"``: none. Returns the encoder (or
    ``None``) and the directory it came from; :class:`~nad_guard.paths.ArtifactError` says why one does not load
    (other classes, other classifier weights, no encoder files)."""
    from nad_guard.encoder import ENCODER_TENSORS, ArchitectureEncoder

    if encoder_dir is None:
        if not (Path(guard_dir) / ENCODER_TENSORS).is_file():
            return None, None
        encoder_dir = guard_dir
    if str(encoder_dir).lower() == "none":
        return None, None
    return ArchitectureEncoder.load(encoder_dir, guard.classifier), str(encoder_dir)
