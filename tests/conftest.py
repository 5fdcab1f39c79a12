"""Shared fixtures: the digits data and a tiny CNN trained on it for a few seconds (seeded)."""

from __future__ import annotations

import pytest
import torch

from nad_guard.data import ImageSet, load_dataset
from nad_guard.models import Classifier
from tiny_models import tiny_digits_cnn, train_tiny


@pytest.fixture(scope="session")
def digits() -> tuple[ImageSet, ImageSet]:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_model(digits: tuple[ImageSet, ImageSet]) -> Classifier:
    """About 97% test accuracy on digits; frozen like any user model. Trained on one thread, so the
    weights are the same on every machine and in every test order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny(tiny_digits_cnn(), digits[0], epochs=10)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    waiting makes each step several times slower. Use with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
