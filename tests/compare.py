"""Comparing nested outputs (tensors, lists, tuples, dicts, plain values) with a reference."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["assert_same"]


def assert_same(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure and types throughout; tensors of the same shape and dtype, close within the tolerances."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key], rtol=rtol, atol=atol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            assert_same(a, e, rtol=rtol, atol=atol)
    elif isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    else:
        assert actual == expected
