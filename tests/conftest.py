"""Fixtures shared by every tier of tests (the fakes they use are in tests/fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscribing cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.models import load_tokenizer

    return load_tokenizer("smollm2")
