"""score_rank / score_values: twins bit-for-bit, an independent reference, filters, errors."""

from __future__ import annotations

import math
import random
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _fast

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def reference(load, capacity, gpu, age, latency, region, healthy, weights, max_age):
    """The formula written out independently, one row at a time: [(index, score)] ranked."""
    wf, wg, wr, wl, wa = (float(w) for w in weights)
    max_age = float(max_age)
    rows = []
    for i in range(len(load)):
        if not healthy[i] or not (0.0 <= age[i] <= max_age):
            continue
        if capacity[i] > 0:
            free = (capacity[i] - load[i]) / capacity[i]
            free = 0.0 if math.isnan(free) else min(max(free, 0.0), 1.0)
        else:
            free = 0.0
        lm = latency[i]
        if math.isnan(lm) or lm < 0:
            lat = 0.5
        elif math.isinf(lm):
            lat = 1.0
        else:
            lat = lm / (lm + 50.0)
        agef = age[i] / max_age if max_age > 0 else 0.0
        s = wf * free + wg * gpu[i] + wr * (1.0 if region[i] else 0.0) - wl * lat - wa * agef
        if not math.isnan(s):
            rows.append((i, s))
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows


odd = st.sampled_from([0.0, -0.0, 1.0, -1.0, 50.0, 1e-300, 1e300, math.inf, -math.inf, math.nan])
any_float = st.one_of(odd, st.floats(allow_nan=True, allow_infinity=True),
                      st.floats(-10, 1000))


@st.composite
def tables(draw, max_n: int = 120):
    n = draw(st.integers(0, max_n))
    col = st.lists(any_float, min_size=n, max_size=n)
    floats = [array("d", draw(col)) for _ in range(5)]
    flags = st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 255)), min_size=n, max_size=n)
    region = bytes(draw(flags))
    healthy = bytes(draw(flags))
    weights = tuple(draw(st.one_of(odd, st.floats(-3, 3))) for _ in range(5))
    max_age = draw(st.one_of(st.sampled_from([0.0, -1.0, 300.0, math.inf, math.nan]),
                             st.floats(0, 2000)))
    limit = draw(st.one_of(st.integers(0, 5), st.integers(0, n + 3)))
    return (*floats, region, healthy), weights, max_age, limit


@SETTINGS
@given(t=tables())
def test_both_match_the_reference_bit_for_bit(t):
    """Each implementation against the reference, and the twins against each other, on
    the same tables: one draw of 150 tables serves all three comparisons (drawing them
    is most of the cost; three tests drawing their own took three times as long)."""
    bufs, weights, max_age, limit = t
    want = [(i, bits(s)) for i, s in reference(*bufs, weights, max_age)]
    impls = {"python": _fast.pure, "cython": _fast.compiled}   # cython: None if not built
    for name, impl in impls.items():
        if impl is None:
            continue
        got = impl.score_values(*bufs, weights, max_age)
        assert [(i, bits(s)) for i, s in got] == want, name
        limited = impl.score_values(*bufs, weights, max_age, limit)
        assert [(i, bits(s)) for i, s in limited] == want[:limit], name
        assert impl.score_rank(*bufs, weights, max_age, limit) == [i for i, _ in want[:limit]], name


def realistic(n: int, seed: int):
    rnd = random.Random(seed)
    cap = [float(rnd.choice([1, 2, 4, 8])) for _ in range(n)]
    load = [rnd.uniform(0, c * 1.2) for c in cap]
    gpu = [rnd.choice([0.2, 0.5, 0.8, 0.9, 1.0]) for _ in range(n)]
    age = [rnd.uniform(-5, 400) for _ in range(n)]
    lat = [rnd.uniform(0, 300) if rnd.random() > 0.1 else -1.0 for _ in range(n)]
    region = bytes(rnd.random() < 0.3 for _ in range(n))
    healthy = bytes(rnd.random() < 0.9 for _ in range(n))
    return (*(array("d", c) for c in (load, cap, gpu, age, lat)), region, healthy)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(4000, 12000), seed=st.integers(0, 2**32 - 1), limit=st.integers(0, 50))
def test_large_tables_filters_and_order(impl, n, seed, limit):
    """Past the GIL-release threshold: filters hold, order is right, nothing better left out."""
    bufs = realistic(n, seed)
    age, healthy = bufs[3], bufs[6]
    weights, max_age = (1.0, 0.8, 0.3, 0.4, 0.2), 300.0
    every = impl.score_values(*bufs, weights, max_age)
    kept = {i for i, _ in every}
    assert kept == {i for i in range(n) if healthy[i] and 0 <= age[i] <= max_age}
    keys = [(-s, i) for i, s in every]
    assert keys == sorted(keys)
    top = impl.score_rank(*bufs, weights, max_age, limit)
    assert top == [i for i, _ in every[:limit]]
    if _fast.compiled is not None and impl is _fast.pure:
        assert _fast.compiled.score_values(*bufs, weights, max_age) == every


def test_hand_computed_example(impl):
    # Row 0: half free A100 nearby; row 1: idle but far and stale; row 2: unhealthy;
    # row 3: too old; row 4: unknown latency (-1 -> 0.5), zero capacity (free 0).
    load = array("d", [1.0, 0.0, 0.0, 0.0, 0.0])
    cap = array("d", [2.0, 4.0, 4.0, 4.0, 0.0])
    gpu = array("d", [0.8, 0.2, 1.0, 1.0, 0.9])
    age = array("d", [0.0, 150.0, 0.0, 301.0, 30.0])
    lat = array("d", [50.0, 450.0, 1.0, 1.0, -1.0])
    region = bytes([1, 0, 1, 1, 0])
    healthy = bytes([1, 1, 0, 1, 1])
    w = (1.0, 1.0, 0.5, 0.5, 0.2)
    got = dict(impl.score_values(load, cap, gpu, age, lat, region, healthy, w, 300.0))
    assert set(got) == {0, 1, 4}
    assert got[0] == 1.0 * 0.5 + 1.0 * 0.8 + 0.5 * 1.0 - 0.5 * 0.5 - 0.2 * 0.0
    assert got[1] == 1.0 * 1.0 + 1.0 * 0.2 + 0.5 * 0.0 - 0.5 * (450.0 / 500.0) - 0.2 * 0.5
    assert got[4] == 1.0 * 0.0 + 1.0 * 0.9 + 0.5 * 0.0 - 0.5 * 0.5 - 0.2 * 0.1
    assert impl.score_rank(load, cap, gpu, age, lat, region, healthy, w, 300.0, 2) == [0, 1]


def test_ties_by_lower_index(impl):
    n = 10
    ones = array("d", [1.0] * n)
    bufs = (array("d", [0.0] * n), ones, ones, array("d", [0.0] * n), ones, bytes(n), b"\x01" * n)
    assert impl.score_rank(*bufs, (1.0, 1.0, 1.0, 1.0, 1.0), 60.0, 4) == [0, 1, 2, 3]
    assert impl.score_rank(*bufs, (1.0, 1.0, 1.0, 1.0, 1.0), 60.0, 99) == list(range(n))


def test_input_kinds_and_int_weights(impl):
    bufs = realistic(300, 5)
    want = impl.score_values(*bufs, (1.0, 0.8, 0.3, 0.4, 0.2), 300.0)
    mv = tuple(memoryview(b) for b in bufs)
    assert impl.score_values(*mv, (1.0, 0.8, 0.3, 0.4, 0.2), 300.0) == want
    other = (*bufs[:5], bytearray(bufs[5]), array("B", bufs[6]))
    assert impl.score_values(*other, [1.0, 0.8, 0.3, 0.4, 0.2], 300) == want
    ints = impl.score_values(*bufs, (1, 0, 0, 0, 0), 300)
    assert ints == impl.score_values(*bufs, (1.0, 0.0, 0.0, 0.0, 0.0), 300.0)
    assert impl.score_rank(*bufs, (1.0, 0.8, 0.3, 0.4, 0.2), 300.0, 0) == []


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # comparing what each implementation raises
        return (type(exc), str(exc))


N = 4
F = array("d", [1.0] * N)
B = b"\x01" * N
W = (1.0, 1.0, 1.0, 1.0, 1.0)
GOOD = [F, F, F, F, F, B, B, W, 100.0, 3]


def bad(pos, value):
    args = list(GOOD)
    args[pos] = value
    return args


BAD = [
    pytest.param(bad(0, [1.0] * N), TypeError, id="load-list"),
    pytest.param(bad(1, None), TypeError, id="capacity-none"),
    pytest.param(bad(2, array("f", [1.0] * N)), TypeError, id="gpu-float32"),
    pytest.param(bad(3, array("q", [1] * N)), TypeError, id="age-int64"),
    pytest.param(bad(4, b"\x00" * 8 * N), TypeError, id="latency-bytes"),
    pytest.param(bad(4, array("d", [1.0] * (N + 1))), ValueError, id="latency-longer"),
    pytest.param(bad(0, array("d", [1.0] * (N - 1))), ValueError, id="load-shorter"),
    pytest.param(bad(5, b"\x01" * (N - 1)), ValueError, id="region-shorter"),
    pytest.param(bad(6, F), TypeError, id="healthy-float"),
    pytest.param(bad(6, "abcd"), TypeError, id="healthy-str"),
    pytest.param(bad(1, memoryview(array("d", [1.0] * 2 * N))[::2]), ValueError, id="strided"),
    pytest.param(bad(7, (1.0, 1.0)), ValueError, id="weights-short"),
    pytest.param(bad(7, 1.0), TypeError, id="weights-scalar"),
    pytest.param(bad(7, (1.0, 1.0, "x", 1.0, 1.0)), TypeError, id="weights-str-item"),
    pytest.param(bad(8, "100"), TypeError, id="max-age-str"),
    pytest.param(bad(8, None), TypeError, id="max-age-none"),
    pytest.param(bad(9, -1), ValueError, id="limit-negative"),
    pytest.param(bad(9, 2.0), TypeError, id="limit-float"),
    pytest.param(bad(9, None), TypeError, id="limit-none"),
]


@pytest.mark.parametrize(("args", "exc"), BAD)
def test_bad_input_raises_clear_error(impl, args, exc):
    with pytest.raises(exc) as info:
        impl.score_rank(*args)
    assert str(info.value)
    if _fast.compiled is not None:
        assert _outcome(_fast.compiled.score_rank, *args) == \
            _outcome(_fast.pure.score_rank, *args)
        assert _outcome(_fast.compiled.score_values, *args) == \
            _outcome(_fast.pure.score_values, *args)


def test_score_values_limit_none_but_rank_requires_limit(impl):
    args = GOOD[:9]
    assert len(impl.score_values(*args)) == N
    with pytest.raises(TypeError):
        impl.score_rank(*args, None)
