"""Gate points: the modules of a classifier whose output gets one gate per channel.

:func:`find_gate_points` chooses them by architecture (or checks the names given) from one dry forward
of zeros; :func:`apply_gate` multiplies a gate point's output channel-wise by a gate, which is how
:mod:`training.paths` learns the class sub-architectures and how a class subnetwork is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from nad_guard.hooks import device_of, hooked
from nad_guard.models import BasicBlock, CifarResNet, Classifier

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardtanh)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class GatePoint:
    """A module (named as in ``net.named_modules()``) whose output gets one gate per channel."""

    name: str
    channels: int


def _unwrap(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(model, Classifier):
        return model.net, model.spec.shape
    if input_shape is None:
        raise ValueError("input_shape (C, H, W) is needed for a plain nn.Module; a Classifier carries its own")
    return model, tuple(input_shape)


def _trace(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """One dry forward on zeros: call count and last output of every module, and leaf call order."""
    calls: dict[str, int] = {}
    outputs: dict[str, Any] = {}
    order: list[str] = []
    names = [n for n, _ in net.named_modules()]
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}

    def record(i: int, out: Any) -> None:
        calls[names[i]] = calls.get(names[i], 0) + 1
        outputs[names[i]] = out
        if names[i] in leaves:
            order.append(names[i])

    with torch.no_grad(), hooked(net, names, record):
        net(torch.zeros(1, *input_shape, device=device_of(net)))
    return calls, outputs, order


def _auto_names(net: nn.Module, calls: dict[str, int], order: list[str]) -> list[str]:
    """The automatic gate points for ``net`` (see :func:`find_gate_points`)."""
    from torchvision.models import DenseNet, MobileNetV2, ResNet
    from torchvision.models.densenet import _DenseBlock, _Transition
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock as TvBasicBlock
    from torchvision.models.resnet import Bottleneck

    modules = dict(net.named_modules())
    if isinstance(net, (ResNet, CifarResNet)):
        return ["relu"] + [n for n, m in modules.items() if isinstance(m, (TvBasicBlock, Bottleneck, BasicBlock))]
    if isinstance(net, MobileNetV2):
        return [n for n, m in modules.items() if isinstance(m, InvertedResidual)]
    if isinstance(net, DenseNet):
        return [n for n, m in modules.items() if isinstance(m, (_DenseBlock, _Transition))]
    found = []
    for j, name in enumerate(order):
        if not isinstance(modules[name], ACTIVATIONS) or calls[name] != 1 or name in found:
            continue
        prev = [modules[n] for n in order[max(0, j - 2):j]]
        if prev and isinstance(prev[-1], nn.modules.conv._ConvNd):
            found.append(name)
        elif len(prev) == 2 and isinstance(prev[-1], NORMS) and isinstance(prev[0], nn.modules.conv._ConvNd):
            found.append(name)
    return found


def find_gate_points(model: nn.Module, layers: Sequence[str] | None = None, *,
                     input_shape: Sequence[int] | None = None) -> list[GatePoint]:
    """Gate points of ``model`` (a :class:`Classifier`, whose ``.net`` is inspected, or a plain network).

    With ``layers=None`` the points are chosen by architecture: ResNets (torchvision and
    :class:`~nad_guard.models.CifarResNet`): the stem activation ``relu`` and every residual block;
    MobileNetV2: every inverted-residual block; DenseNet: every dense block and transition; any other
    network (VGG, ``nn.Sequential``, custom CNNs): every activation module that directly follows a
    convolution, possibly through a normalisation layer. Blocks are hooked rather than a ReLU module
    that a block calls several times. Otherwise ``layers`` names the modules explicitly.

    Channel counts come from one dry forward of zeros shaped like the model's input (``input_shape``
    ``(C, H, W)`` is required for a plain network). Each point must be called exactly once per forward
    and return a tensor of shape ``(N, C, ...)``.
    """
    net, shape = _unwrap(model, input_shape)
    if isinstance(net, torch.jit.ScriptModule):
        raise ValueError("a TorchScript model cannot be hooked, so its paths cannot be read; wrap the eager "
                         "nn.Module with its weights instead")
    calls, outputs, order = _trace(net, shape)
    auto = _auto_names(net, calls, order)
    if layers is None:
        if not auto:
            raise ValueError(f"found no gate points automatically in {type(net).__name__} (no activation module "
                             "called once right after a convolution); name the layers explicitly")
        names = auto
    else:
        names = list(layers)
        known = dict(net.named_modules())
        examples = ", ".join((auto or list(calls))[:8])
        for name in names:
            if name not in known or name == "":
                raise ValueError(f"no module named {name!r} in {type(net).__name__}; valid names include {examples}")
        if len(set(names)) != len(names):
            raise ValueError(f"layer names repeat: {names}")
    points = []
    for name in names:
        count, out = calls.get(name, 0), outputs.get(name)
        if count != 1:
            raise ValueError(f"module {name!r} is called {count} times per forward, it needs exactly one call; "
                             "hook the block that contains it instead")
        if not torch.is_tensor(out) or out.ndim < 2:
            raise ValueError(f"module {name!r} does not return a (N, C, ...) tensor, got {type(out).__name__}")
        points.append(GatePoint(name, int(out.shape[1])))
    return points


def apply_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Multiply ``out`` ``(N, C, ...)`` channel-wise by ``gate`` ``(N, C)``."""
    if out.shape[:2] != gate.shape:
        raise ValueError(f"gate of shape {tuple(gate.shape)} does not fit output {tuple(out.shape)}")
    return out * gate.to(out.dtype).view(*gate.shape, *([1] * (out.ndim - 2)))
