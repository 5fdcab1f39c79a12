"""How a model's *name* (``--model`` on every command) becomes a :class:`~nad_guard.models.Classifier`.

:func:`build_classifier` is the one way: a reference model, a torchvision architecture,
``package.module:function`` (a factory the user writes, :func:`classifier_from_factory`) or the path of an
exported program (``.pt2``) or TorchScript file (:func:`load_torchscript`). A classifier built from a
factory or a graph file carries :attr:`Classifier.source`, which a guard records
(:func:`nad_guard.guard.classifier_reference`) so that it can be rebuilt from the guard directory alone.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Sequence

import torch

from nad_guard.models import (IMAGENET_MEAN, IMAGENET_STD, REFERENCE_MODELS, Classifier, InputSpec, load_into,
                              load_reference, load_state_dict_file, torchvision_classifier)


GRAPH_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".jit")  # what build_classifier takes for a graph file


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path: str | Path, spec: InputSpec) -> Classifier:
    """Wrap a saved graph with its input spec: a TorchScript file (``torch.jit.save``) or an
    exported program (``torch.export.save``, suffix ``.pt2``).

    An exported program is unflattened (``torch.export.unflatten``), so its submodules keep the names
    of the original network and run as modules that can be hooked: gate points are named with
    ``--layers`` (their types are gone, so they are not found automatically; see
    :func:`exported_activation_layers`). A TorchScript module cannot be hooked at all: it serves as a
    plain classifier, but paths cannot be learned for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    exported = path.suffix == ".pt2"
    try:
        if exported:
            program = torch.export.load(str(path))
            try:
                net = torch.export.unflatten(program)
            except Exception:  # a program unflatten cannot restore: one graph, still a classifier
                net = program.module()
        else:
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        kind = "an exported program (.pt2)" if exported else "TorchScript"
        raise ValueError(f"cannot load {path} as {kind}: {e}") from e
    fmt = "export" if exported else "torchscript"
    source = {"builder": "graph", "format": fmt, "path": str(path.resolve()), "sha256": file_sha256(path)}
    return Classifier(net, spec, f"{fmt}:{path.name}", source)


ACTIVATION_OPS = ("relu", "gelu", "silu", "hardswish", "hardtanh", "elu", "selu", "celu", "mish", "prelu")


def exported_activation_layers(clf: Classifier) -> list[str]:
    """Names of the leaf submodules of an exported program (:func:`load_torchscript`) whose graph
    applies an activation function: candidates for ``--layers``, which nad-guard cannot choose by type
    in an exported program. Empty for any other network."""
    if (clf.source or {}).get("format") != "export":
        return []
    found = []
    for name, m in clf.net.named_modules():
        graph = getattr(m, "graph", None)
        if not name or graph is None or any(True for _ in m.children()):
            continue
        ops = [getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in graph.nodes
               if n.op == "call_function"]  # aten ops: 'relu.default', 'relu_.default', 'leaky_relu.default'
        if any(a in op for op in ops for a in ACTIVATION_OPS):
            found.append(name)
    return found


def graph_layers_problem(clf: Classifier, layers: Sequence[str] | None) -> str | None:
    """Why paths cannot be learned for a graph-file classifier as asked, in words for the command line,
    or ``None``: a TorchScript module cannot be hooked at all; an exported program's gate points must
    be named (``layers``), and the message suggests its activation modules."""
    src = clf.source or {}
    fmt, model = src.get("format"), src.get("model") or Path(src.get("path", clf.name)).name
    if fmt == "torchscript":
        return (f"{model} is TorchScript, whose modules cannot be hooked, so no paths can be learned for it: "
                "save it with torch.export.save (a .pt2 exported program) or name a factory "
                "(--model package.module:function)")
    if fmt == "export" and not layers:
        found = exported_activation_layers(clf)
        example = (f"e.g. --layers {','.join(found)} (its activation modules)" if found else
                   "modules called once per forward whose output is (N, C, H, W)")
        return (f"{model} is an exported program: it keeps its modules' names but not their types, so nad-guard "
                f"does not choose its gate points by itself; name them with --layers, {example}")
    return None


def classifier_from_factory(ref: str) -> Classifier:
    """Call the user's factory ``package.module:function`` (no arguments); it must return a
    :class:`Classifier` (its weights loaded, or replaced afterwards by ``--weights`` or a guard's stored
    weights). ``ValueError`` says what is wrong, and for a module that cannot be imported, to put the
    folder that holds it on ``PYTHONPATH``. The classifier's :attr:`~Classifier.source` records ``ref``."""
    module, _, func = ref.partition(":")
    if not module or not func:
        raise ValueError(f"{ref!r} must look like package.module:function")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module!r} for {ref!r} ({e}); put the folder that holds it on "
                         "PYTHONPATH, e.g. PYTHONPATH=path/to/folder nad-guard ... (or bentoml serve ...)") from e
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"{module!r} has no function {func!r} (for {ref!r})")
    clf = fn()
    if not isinstance(clf, Classifier):
        raise ValueError(f"{ref} returned {type(clf).__name__}, not a nad_guard Classifier")
    clf.source = {"builder": "factory", "factory": ref}
    return clf


def parse_floats(text: str | Sequence[float] | None, what: str = "value") -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` (or a sequence of numbers) -> ``(0.5, 0.5, 0.5)``; ``None`` stays ``None``."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(v) for v in parts if str(v).strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, one per channel, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def weights_normalisation(weights: str | Path | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from a safetensors weights file's own metadata (``"mean"`` and ``"std"``, each a
    JSON list or comma-separated numbers), or ``None`` when the file says nothing."""
    if weights is None or Path(weights).suffix != ".safetensors" or not Path(weights).is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {weights}: {e}") from e
    if "mean" not in meta or "std" not in meta:
        return None
    values = []
    for key in ("mean", "std"):
        raw = meta[key].strip()
        values.append(parse_floats(json.loads(raw) if raw.startswith("[") else raw, f"{weights} metadata {key!r}"))
    return values[0], values[1]


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} needs {channels} values (one per channel) or one for all, got {len(values)}")
    return values


def is_graph_file(model: str) -> bool:
    """Whether ``--model`` names a graph file (an exported program or TorchScript) by its suffix."""
    return Path(model).suffix in GRAPH_SUFFIXES


def build_classifier(model: str, weights: str | Path | None = None, *, class_names: Sequence[str],
                     input_size: int, channels: int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Classifier:
    """The one way the project turns a model's name (``--model``) into a :class:`Classifier`:

    * a reference model (:data:`REFERENCE_MODELS`; its bundled weights unless ``weights``);
    * a torchvision architecture (sized to ``class_names`` and ``input_size``; random weights unless
      ``weights``), normalised with ``mean``/``std``, else those in the safetensors weights file's
      metadata (:func:`weights_normalisation`), else ImageNet's;
    * the path of an exported program (``.pt2``) or TorchScript file (suffix in :data:`GRAPH_SUFFIXES`),
      whose input spec is the data's: ``channels`` x ``input_size`` x ``input_size``, ``class_names``,
      and ``mean``/``std`` when given, else none (mean 0, std 1: the graph gets ``[0, 1]`` pixels, as
      a deployed graph that does its own preprocessing expects);
    * ``package.module:function`` (:func:`classifier_from_factory`), whose classifier brings its own spec.

    ``weights`` (safetensors or a weights-only torch checkpoint) replace the model's weights.
    ``mean``/``std`` (one value per channel, or one for all) apply to torchvision models and graph
    files only; for the others they are an error, not silently ignored."""
    import torchvision

    mean, std = parse_floats(mean, "mean"), parse_floats(std, "std")
    if (mean is None) != (std is None):
        raise ValueError("give --mean and --std together")
    norm_given = mean is not None
    if model in REFERENCE_MODELS:
        if norm_given:
            raise ValueError(f"--mean/--std apply to torchvision models and .pt2/TorchScript files; {model} "
                             "normalises as it was trained")
        if weights is None:
            return load_reference(model)
        clf = REFERENCE_MODELS[model](class_names)
    elif model in torchvision.models.list_models(module=torchvision.models):
        if not norm_given:
            mean, std = weights_normalisation(weights) or (IMAGENET_MEAN, IMAGENET_STD)
        return torchvision_classifier(model, len(class_names), weights, input_size=input_size,
                                      mean=_per_channel(mean, 3, "--mean"), std=_per_channel(std, 3, "--std"),
                                      class_names=class_names)
    elif is_graph_file(model):
        c = channels or 3
        mean, std = (mean, std) if norm_given else ((0.0,), (1.0,))
        spec = InputSpec(c, input_size, input_size, _per_channel(mean, c, "--mean"), _per_channel(std, c, "--std"),
                         list(class_names))
        clf = load_torchscript(model, spec)
    elif ":" in model:
        if norm_given:
            raise ValueError(f"--mean/--std apply to torchvision models and .pt2/TorchScript files; the "
                             f"classifier {model} returns carries its own input spec")
        clf = classifier_from_factory(model)
    else:
        raise ValueError(f"unknown model {model!r}: use a reference model ({', '.join(REFERENCE_MODELS)}), "
                         "a torchvision architecture, package.module:function, or the path of a .pt2 "
                         "exported program or TorchScript file")
    if weights is not None:
        load_into(clf.net, load_state_dict_file(weights), str(weights))
    return clf
