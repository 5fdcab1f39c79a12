"""Tiny seeded models for the tests (importable by subprocesses with ``tests`` on ``PYTHONPATH``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nad_guard.data import ImageSet
from nad_guard.models import Classifier, InputSpec, from_module

DIGITS_SPEC = dict(channels=1, height=8, width=8, mean=(0.3,), std=(0.4,))


def tiny_digits_cnn() -> Classifier:
    """A 3-conv CNN for 8x8 digits (16, 16, 32 channels), seeded random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return from_module(net, InputSpec(**DIGITS_SPEC, class_names=[str(i) for i in range(10)]), "tiny-digits-cnn")


def train_tiny(model: Classifier, data: ImageSet, epochs: int = 15, seed: int = 0) -> Classifier:
    """Adam on ``model.net`` for a few epochs, then frozen again (eval, ``requires_grad=False``)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.01)
    for _ in range(epochs):
        model.net.train()
        perm = torch.randperm(len(data), generator=gen)
        for s in range(0, len(data), 64):
            idx = perm[s:s + 64]
            loss = F.cross_entropy(model.net(model.normalize(data.images[idx].float() / 255)), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return model
