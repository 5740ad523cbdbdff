"""The token store: hashed, mode 0600, uses counted exactly by concurrent processes
(the command line and the daemon share it through a file lock), replays remembered."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time

import pytest

from agent.admission.enrollment import token_digest
from agent.admission.tokens import TokenError, TokenStore, parse_duration
from tests.util import requires


def test_stored_hashed_private_and_listed(tmp_path):
    store = TokenStore(tmp_path)
    secret, _tok = store.create(name="batch-3", services="ocr", uses=50, expires_s=86400)
    assert secret.startswith("rmat_") and len(secret) == 48
    text = store.path.read_text()
    assert secret not in text and token_digest(secret).hex() in text
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    [t] = store.list()
    assert (t.name, t.services, t.uses, t.used, t.state(time.time())) == \
        ("batch-3", ("ocr",), 50, 0, "active")
    assert store.create()[1].name == "token-1"
    with pytest.raises(TokenError, match="already exists"):
        store.create(name="batch-3")
    assert store.revoke("batch-3").state(time.time()) == "revoked"
    with pytest.raises(TokenError, match="no token named"):
        store.revoke("nope")


def test_use_outcomes(tmp_path):
    store = TokenStore(tmp_path)
    now = time.time()
    secret, _ = store.create(name="t", services="ocr", uses=2, expires_s=600, now=now)
    assert store.use("rmat_wrong", (), b"r0", now=now).result == "unknown"
    assert store.use(secret, ("asr",), b"r1", now=now).result == "services"
    first = store.use(secret, (), b"r2", now=now)
    assert (first.result, first.services, first.token.used) == ("ok", ("ocr",), 1)
    assert store.use(secret, (), b"r2", now=now + 1).result == "replay"
    assert store.use(secret, (), b"r3", now=now).result == "ok"
    assert store.use(secret, (), b"r4", now=now).result == "used up"
    assert store.use(secret, (), b"r2", now=now + 2).result == "replay"   # still the same request
    assert store.use(secret, (), b"r2", now=now + 700).result == "expired"
    assert [t.used for t in store.list()] == [2]


def _worker(path: str, secret: str, n: int, base: int, out: multiprocessing.Queue) -> None:
    store = TokenStore(path)
    out.put(sum(store.use(secret, (), f"req-{base + i}".encode()).result == "ok"
                for i in range(n)))


def test_concurrent_processes_count_exactly(tmp_path):
    store = TokenStore(tmp_path)
    secret, _ = store.create(name="shared", uses=25)
    q: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.get_context("fork").Process(
        target=_worker, args=(str(tmp_path), secret, 10, 100 * k, q)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sum(q.get(timeout=5) for _ in procs) == 25
    assert [t.used for t in store.list()] == [25]


def test_unreadable_store_is_an_error_not_a_reset(tmp_path):
    store = TokenStore(tmp_path)
    store.create(name="a")
    store.path.write_text("{broken")
    with pytest.raises(TokenError, match="unreadable token store"):
        store.use("rmat_x", (), b"r")
    assert store.path.read_text() == "{broken"


@pytest.mark.parametrize("text,secs", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800),
                                       ("90s", 90), ("2w", 14 * 86400), ("1", 86400)])
def test_durations(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "7x", "-1d", "10s", "400d", "d"])
def test_bad_durations(text):
    with pytest.raises(TokenError):
        parse_duration(text)


@requires(None if os.geteuid() == 0 else "needs root (chown to the state dir's owner)")
def test_root_hands_the_files_to_the_state_dirs_owner(tmp_path):
    """``sudo rma-agent token create``: the daemon (the state dir's owner) must still be
    able to count uses in the files root wrote."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    store = TokenStore(state)
    store.create(name="a")
    store.revoke("a")
    for p in (store.path, store.lock_path):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
