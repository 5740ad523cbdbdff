"""Fixtures shared by the kernel tests: every test runs against both implementations."""

from __future__ import annotations

import pytest

import _fast

IMPLS = [
    pytest.param(_fast.pure, id="python"),
    pytest.param(
        _fast.compiled,
        id="cython",
        marks=pytest.mark.skipif(
            _fast.compiled is None,
            reason=f"Cython kernels not built ({_fast.COMPILED_ERROR}); "
                   "run `python3 setup.py build_ext --inplace`",
        ),
    ),
]


@pytest.fixture(params=IMPLS)
def impl(request):
    """One implementation namespace: k_closest, xor_distance_cmp, score_rank, score_values."""
    return request.param
