"""The architecture encoder of Interpretable Neural Network Decoupling (NND, Li et al., ECCV 2020): per-input
gates at every gate point, from the layer's input (docs/encoder.md).

- :mod:`~nad_guard.encoder.model`: :class:`ArchitectureEncoder` (control modules, hooks, save/load);
- :mod:`~nad_guard.encoder.features`: :func:`encoder_features`, the gate vector against the class
  sub-architectures and the class-mean encodings (detection features);
- :mod:`~nad_guard.encoder.accelerate`: :func:`skip_forward`, the decoupled network with closed channels
  skipped, and the FLOP and wall-time measures; :func:`skip_forward_topk`, the same for a
  :class:`BoostedResNet`;
- :mod:`~nad_guard.encoder.boost`: :class:`BoostedResNet`, a fine-tuned copy of a CIFAR ResNet with
  winner-take-all (top-k) gates on every block's inner channels (feature boosting and suppression).

Training lives in ``training/encoder.py`` (``nad-guard fit-encoder``) and ``training/boost.py``.
"""

from nad_guard.encoder.accelerate import check_skippable, count_flops, skip_forward, skip_forward_topk, wall_seconds
from nad_guard.encoder.boost import BOOSTED_FORMAT, BOOSTED_VERSION, BoostedResNet, kd_loss, topk_gates
from nad_guard.encoder.features import encoder_features
from nad_guard.encoder.model import (ENCODER_FORMAT, ENCODER_META, ENCODER_TENSORS, ENCODER_VERSION,
                                     ArchitectureEncoder, ControlModule, gate_values, read_encoder_meta)

__all__ = ["ArchitectureEncoder", "ControlModule", "gate_values", "read_encoder_meta", "ENCODER_FORMAT",
           "ENCODER_VERSION", "ENCODER_META", "ENCODER_TENSORS", "encoder_features", "skip_forward",
           "check_skippable", "count_flops", "wall_seconds", "BoostedResNet", "topk_gates", "kd_loss",
           "skip_forward_topk", "BOOSTED_FORMAT", "BOOSTED_VERSION"]
