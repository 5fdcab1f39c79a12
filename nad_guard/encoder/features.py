"""The encoder's gate vector as detection features (NND's use 1): how an input's own path compares with
its predicted class's sub-architecture (the :class:`~nad_guard.paths.PathModel` masks) and with the
class's typical encodings (the encoder's ``class_means``).

Per input (``B`` rows), with ``g`` the soft gate vector over all gate points and ``k`` the decoupled
network's predicted class:

- ``enc_cos_mask``: cosine of ``g`` with class ``k``'s binary mask (all gate points concatenated);
- ``enc_cos_mean``: cosine of ``g`` with class ``k``'s mean encoding;
- ``enc_mean_margin``: ``enc_cos_mean`` minus the largest cosine with another class's mean encoding;
- ``enc_nearest_is_pred``: 1 when the nearest class-mean encoding is class ``k``'s;
- ``enc_kept``: the share of channels the hard gates keep (``g > 0.5``);
- ``enc_fidelity``: the decoupled network's softmax probability of the original prediction;
- per gate point ``l``: ``enc_cos_mask/<l>`` and ``enc_cos_mean/<l>``.

Cost: one forward of the decoupled network (the classifier's forward plus the control modules' few
small matrix products) and one plain forward for the original prediction; see docs/encoder.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nad_guard.encoder.model import ArchitectureEncoder
from nad_guard.paths import PathModel


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1, eps=1e-8)


@torch.no_grad()
def encoder_features(encoder: ArchitectureEncoder, paths: PathModel | None, x: torch.Tensor,
                     batch_size: int = 256) -> tuple[torch.Tensor, list[str]]:
    """The features above for ``x`` float ``(B, C, H, W)`` in ``[0, 1]``: a ``(B, F)`` float32 matrix and the
    ``F`` column names. Without ``paths`` the mask columns are left out. Rows do not depend on each other."""
    means = encoder.class_means
    masks = None
    if paths is not None:
        if paths.layer_names_ != encoder.names:
            raise ValueError(f"the encoder's gate points {encoder.names} are not the path model's {paths.layer_names_}")
        masks = torch.cat([paths.masks_[n].float() for n in encoder.names], 1).to(means.device)
    rows = []
    for xb in x.split(batch_size):
        original = encoder.classifier(xb).argmax(1)
        logits, gates, _ = encoder(xb, "soft")
        g = torch.cat(gates, 1)
        k = logits.argmax(1)
        cols = {}
        parts = encoder.split(g)
        if masks is not None:
            cols["enc_cos_mask"] = _cos(g, masks[k])
        cm = F.normalize(g, dim=1) @ F.normalize(means, dim=1).T  # (B, K)
        own = cm.gather(1, k[:, None]).squeeze(1)
        other = cm.scatter(1, k[:, None], float("-inf")).amax(1)
        cols["enc_cos_mean"], cols["enc_mean_margin"] = own, own - other
        cols["enc_nearest_is_pred"] = (cm.argmax(1) == k).float()
        cols["enc_kept"] = (g > 0.5).float().mean(1)
        cols["enc_fidelity"] = logits.softmax(1).gather(1, original[:, None]).squeeze(1)
        mean_parts = encoder.split(means)
        mask_parts = encoder.split(masks) if masks is not None else None
        for i, name in enumerate(encoder.names):
            if mask_parts is not None:
                cols[f"enc_cos_mask/{name}"] = _cos(parts[i], mask_parts[i][k])
            cols[f"enc_cos_mean/{name}"] = _cos(parts[i], mean_parts[i][k])
        rows.append((torch.stack(list(cols.values()), 1).float().cpu(), list(cols)))
    return torch.cat([r[0] for r in rows]), rows[0][1]
