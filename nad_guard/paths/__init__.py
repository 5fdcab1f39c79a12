"""Class sub-architectures (NAD masks) and how far an input's activated path is from them.

The package holds one idea per file:

- :mod:`~nad_guard.paths.gate_points`: the modules whose output gets one gate per channel
  (:class:`GatePoint`, :func:`discover_gate_points` and its :class:`GateDiscovery`, :func:`find_gate_points`,
  :func:`apply_gate`); :mod:`~nad_guard.paths.discovery`: how they are found, by structure, from one dry
  forward's autograd graph.
- :mod:`~nad_guard.paths.features`: the path-divergence features and the channel statistics they use
  (its docstring documents every feature; :func:`path_features`, :class:`PathFeatures`, :class:`ChannelStats`).
- :mod:`~nad_guard.paths.model`: the fitted :class:`PathModel` of a classifier.
- :mod:`~nad_guard.paths.artifact`: the saved artifact's file format and checks (:class:`ArtifactError`,
  :func:`read_meta`).

Every name is importable from ``nad_guard.paths`` itself.
"""

from nad_guard.paths.artifact import (ARTIFACT_FORMAT, ARTIFACT_VERSION, META_FILE, SPEC_KEYS, TENSOR_FILE,
                                      ArtifactError, library_versions, read_meta, weights_fingerprint)
from nad_guard.paths.features import (GLOBAL_FEATURES, LAYER_FEATURES, SUBNET_FEATURES, ChannelStats, LayerBasis,
                                      PathFeatures, feature_basis, feature_matrix, mask_similarity, path_features,
                                      path_similarity, subnetwork_features)
from nad_guard.paths.discovery import ACTIVATIONS, MIN_CHANNELS, NORMS
from nad_guard.paths.gate_points import (MIN_COVERAGE, MIN_GATE_POINTS, GateCoverageWarning, GateDiscovery, GatePoint,
                                         apply_gate, discover_gate_points, find_gate_points)
from nad_guard.paths.model import PathModel

__all__ = [
    # gate_points
    "ACTIVATIONS", "NORMS", "MIN_CHANNELS", "MIN_GATE_POINTS", "MIN_COVERAGE", "GatePoint", "GateDiscovery",
    "GateCoverageWarning", "discover_gate_points", "find_gate_points", "apply_gate",
    # features
    "LAYER_FEATURES", "GLOBAL_FEATURES", "SUBNET_FEATURES", "ChannelStats", "LayerBasis", "feature_basis",
    "path_features", "subnetwork_features", "feature_matrix", "path_similarity", "mask_similarity", "PathFeatures",
    # model
    "PathModel",
    # artifact
    "ARTIFACT_FORMAT", "ARTIFACT_VERSION", "META_FILE", "TENSOR_FILE", "SPEC_KEYS", "ArtifactError", "read_meta",
    "weights_fingerprint", "library_versions",
]
