# -*- coding: utf-8 -*-
"""Test set-up: Triton runs in its interpreter on CPU-only machines, and fresh memory is poisoned.

TRITON_INTERPRET must be set before any kernel module is imported, hence at the very top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out
    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch, request):
    """NaN-fill torch.empty / empty_like so that any output a kernel forgets to write shows up (not for tests
    marked ``no_poison``: torch.compile's own allocations must stay untouched)."""
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    monkeypatch.setattr(torch, "empty", _poisoned(_empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(_empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(_new_empty))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
