"""k_closest / xor_distance_cmp: both implementations against each other and brute force."""

from __future__ import annotations

import random
import threading
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _fast

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

ZERO = bytes(20)
FF = b"\xff" * 20
HALF = b"\x80" + bytes(19)


def brute(target: bytes, ids: bytes, k: int) -> list[int]:
    """Reference: sort every index by (XOR distance as a 160-bit int, index)."""
    t = int.from_bytes(target, "big")
    n = len(ids) // 20
    order = sorted(range(n), key=lambda i: (int.from_bytes(ids[20 * i:20 * i + 20], "big") ^ t, i))
    return order[:k]


# Ids: random, a few special ones, and many duplicates (drawn from a small pool), so that
# ties by index and "target equal to an id" happen often.
special_ids = st.sampled_from([ZERO, FF, HALF, b"\x7f" + b"\xff" * 19, ZERO[:19] + b"\x01"])
random_ids = st.binary(min_size=20, max_size=20)
# Ids that differ only in their last word (bits 128..159) or middle word: the kernel's
# second and third compares must decide.
near_ids = st.tuples(st.integers(0, 3), st.binary(min_size=4, max_size=4)).map(
    lambda t: bytes([t[0]]) * 16 + t[1])
one_id = st.one_of(random_ids, special_ids, near_ids,
                   st.binary(min_size=12, max_size=12).map(lambda b: bytes(8) + b))


@st.composite
def cases(draw, max_n: int = 300):
    pool = draw(st.lists(one_id, min_size=1, max_size=12))
    ids = draw(st.lists(st.one_of(one_id, st.sampled_from(pool)), max_size=max_n))
    buf = b"".join(ids)
    target = draw(st.one_of(one_id, st.sampled_from(pool), st.sampled_from(ids) if ids else one_id))
    k = draw(st.one_of(st.integers(0, 25), st.integers(0, len(ids) + 5)))
    return target, buf, k


@SETTINGS
@given(case=cases())
def test_both_match_brute_force(case):
    """Each kernel against brute force on the same cases, so the twins agree too (one
    draw serves both: drawing is most of the cost)."""
    target, buf, k = case
    want = brute(target, buf, k)
    impls = {"python": _fast.pure, "cython": _fast.compiled}   # cython: None if not built
    for name, impl in impls.items():
        if impl is None:
            continue
        got = impl.k_closest(target, buf, k)
        assert got == want, name
        assert all(type(i) is int for i in got), name


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 6000), k=st.one_of(st.integers(0, 40), st.integers(0, 7000)),
       seed=st.integers(0, 2**32 - 1), dup=st.booleans())
def test_large_n(impl, n, k, seed, dup):
    """Thousands of ids (past the GIL-release threshold of 4096)."""
    rnd = random.Random(seed)
    if dup:
        pool = [rnd.randbytes(20) for _ in range(50)] + [ZERO, FF]
        buf = b"".join(rnd.choice(pool) for _ in range(n))
    else:
        buf = rnd.randbytes(20 * n)
    target = buf[20 * (n // 2):20 * (n // 2) + 20] if n and rnd.random() < 0.5 else rnd.randbytes(20)
    got = impl.k_closest(target, buf, k)
    assert got == brute(target, buf, k)
    if _fast.compiled is not None and impl is _fast.pure:
        assert got == _fast.compiled.k_closest(target, buf, k)


@pytest.mark.parametrize("fill", [ZERO, FF])
@pytest.mark.parametrize("target", [ZERO, FF, HALF])
def test_all_equal_ids_tie_by_index(impl, fill, target):
    buf = fill * 50
    assert impl.k_closest(target, buf, 7) == list(range(7))
    assert impl.k_closest(target, buf, 80) == list(range(50))


@pytest.mark.parametrize("n", [128, 256, 1200, 8192])
@pytest.mark.parametrize("near_every", [8, 7, 1000])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_layouts_that_defeat_a_sampled_threshold(impl, n, near_every, k):
    """Ids every `near_every` positions are near the target, the rest far (and the other
    way round): whatever a strided sample of the buffer suggests, the answer is exact."""
    rnd = random.Random(n * 31 + near_every)
    target = rnd.randbytes(20)
    t = int.from_bytes(target, "big")
    near = [(t ^ rnd.getrandbits(40)).to_bytes(20, "big") for _ in range(n)]
    far = [(t ^ (rnd.getrandbits(159) | 1 << 159)).to_bytes(20, "big") for _ in range(n)]
    for flip in (False, True):
        buf = b"".join((near if (i % near_every == 0) != flip else far)[i] for i in range(n))
        assert impl.k_closest(target, buf, k) == brute(target, buf, k)


def test_target_equal_to_an_id_comes_first(impl):
    rnd = random.Random(7)
    ids = [rnd.randbytes(20) for _ in range(500)]
    for j in (0, 17, 499):
        assert impl.k_closest(ids[j], b"".join(ids), 3)[0] == j


def test_k_edge_values(impl):
    buf = random.Random(1).randbytes(20 * 30)
    t = bytes(range(20))
    assert impl.k_closest(t, buf, 0) == []
    assert impl.k_closest(t, b"", 0) == []
    assert impl.k_closest(t, b"", 5) == []
    assert impl.k_closest(t, buf, 31) == brute(t, buf, 30)
    assert impl.k_closest(t, buf, 2**70) == brute(t, buf, 30)  # huge k is just "all"
    assert impl.k_closest(t, buf, True) == brute(t, buf, 1)    # bool is an int


def test_buffer_kinds(impl):
    rnd = random.Random(3)
    raw = rnd.randbytes(20 * 200)
    t = rnd.randbytes(20)
    want = brute(t, raw, 20)
    big = b"\x00" * 40 + raw + b"\x00" * 20
    for buf in (raw, bytearray(raw), memoryview(raw), array("B", raw),
                memoryview(big)[40:40 + len(raw)],          # offset slice, still contiguous
                memoryview(raw).cast("B", (200, 20)),        # 2-D, C-contiguous
                array("I", raw)):                            # other item size: raw bytes
        assert impl.k_closest(t, buf, 20) == want, type(buf)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the point is to compare what each raises
        return (type(exc), str(exc))


BAD = [
    pytest.param("x" * 20, ZERO, 1, TypeError, id="str-target"),
    pytest.param(bytearray(20), ZERO, 1, TypeError, id="bytearray-target"),
    pytest.param(None, ZERO, 1, TypeError, id="none-target"),
    pytest.param(b"x" * 19, ZERO, 1, ValueError, id="short-target"),
    pytest.param(b"x" * 21, ZERO, 1, ValueError, id="long-target"),
    pytest.param(ZERO, b"a" * 21, 1, ValueError, id="ids-not-multiple-of-20"),
    pytest.param(ZERO, b"a" * 19, 1, ValueError, id="ids-short"),
    pytest.param(ZERO, "a" * 40, 1, TypeError, id="ids-str"),
    pytest.param(ZERO, [ZERO, FF], 1, TypeError, id="ids-list"),
    pytest.param(ZERO, None, 1, TypeError, id="ids-none"),
    pytest.param(ZERO, memoryview(bytes(80))[::2], 1, ValueError, id="ids-strided"),
    pytest.param(ZERO, ZERO, -1, ValueError, id="k-negative"),
    pytest.param(ZERO, ZERO, -(2**80), ValueError, id="k-very-negative"),
    pytest.param(ZERO, ZERO, 1.0, TypeError, id="k-float"),
    pytest.param(ZERO, ZERO, "3", TypeError, id="k-str"),
    pytest.param(ZERO, ZERO, None, TypeError, id="k-none"),
]


@pytest.mark.parametrize(("target", "ids", "k", "exc"), BAD)
def test_bad_input_raises_clear_error(impl, target, ids, k, exc):
    with pytest.raises(exc) as info:
        impl.k_closest(target, ids, k)
    assert str(info.value)  # a message that says what is wrong
    if _fast.compiled is not None:
        assert _outcome(_fast.compiled.k_closest, target, ids, k) == \
            _outcome(_fast.pure.k_closest, target, ids, k)


def test_concurrent_threads_release_gil(impl):
    """Large calls release the GIL: several threads at once still get exact answers."""
    rnd = random.Random(11)
    buf = rnd.randbytes(20 * 20000)
    targets = [rnd.randbytes(20) for _ in range(6)]
    want = {t: brute(t, buf, 20) for t in targets}
    got: dict[bytes, list[int]] = {}
    errors: list[BaseException] = []

    def run(t):
        try:
            for _ in range(3):
                got[t] = impl.k_closest(t, buf, 20)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    assert got == want


# ----------------------------------------------------------------- k_closest_items
@SETTINGS
@given(case=cases())
def test_items_variant(impl, case):
    target, buf, k = case
    items = [object() for _ in range(len(buf) // 20)]
    got = impl.k_closest_items(target, buf, k, items)
    assert len(got) == len(set(map(id, got)))
    assert [items.index(x) for x in got] == brute(target, buf, k)


@pytest.mark.parametrize(("items", "exc"), [
    (None, TypeError), ((1, 2), TypeError), ([1], ValueError), ([1, 2, 3], ValueError),
])
def test_items_variant_bad_items(impl, items, exc):
    with pytest.raises(exc):
        impl.k_closest_items(ZERO, ZERO * 2, 1, items)
    if _fast.compiled is not None:
        assert _outcome(_fast.compiled.k_closest_items, ZERO, ZERO * 2, 1, items) == \
            _outcome(_fast.pure.k_closest_items, ZERO, ZERO * 2, 1, items)


@pytest.mark.parametrize(("target", "ids", "k", "exc"), BAD)
def test_items_variant_bad_input(impl, target, ids, k, exc):
    try:
        items = [None] * (memoryview(ids).nbytes // 20)  # right length: the error is elsewhere
    except TypeError:
        items = []
    with pytest.raises(exc):
        impl.k_closest_items(target, ids, k, items)
    if _fast.compiled is not None:
        assert _outcome(_fast.compiled.k_closest_items, target, ids, k, items) == \
            _outcome(_fast.pure.k_closest_items, target, ids, k, items)


# ----------------------------------------------------------------- xor_distance_cmp
@SETTINGS
@given(a=one_id, b=one_id, t=one_id)
def test_distance_cmp(impl, a, b, t):
    ti = int.from_bytes(t, "big")
    da, db = int.from_bytes(a, "big") ^ ti, int.from_bytes(b, "big") ^ ti
    want = (da > db) - (da < db)
    assert impl.xor_distance_cmp(a, b, t) == want
    assert impl.xor_distance_cmp(b, a, t) == -want


@given(a=one_id, t=one_id)
@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_distance_cmp_equal(impl, a, t):
    assert impl.xor_distance_cmp(a, a, t) == 0


@pytest.mark.parametrize("args", [
    (b"x" * 19, ZERO, ZERO), (ZERO, "y" * 20, ZERO), (ZERO, ZERO, None), (ZERO, ZERO, b""),
])
def test_distance_cmp_bad_input(impl, args):
    with pytest.raises((TypeError, ValueError)):
        impl.xor_distance_cmp(*args)
    if _fast.compiled is not None:
        assert _outcome(_fast.compiled.xor_distance_cmp, *args) == \
            _outcome(_fast.pure.xor_distance_cmp, *args)
