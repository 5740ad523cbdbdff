"""Identity: created once with safe permissions, reused after restart, refused when exposed."""

import hashlib
import os
import stat

import pytest

from agent.dht.identity import Identity, IdentityError


def test_create_then_reload_same_identity(tmp_path):
    state = tmp_path / "state"
    a = Identity.load_or_create(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    key = state / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    b = Identity.load_or_create(state)
    assert a.node_id == b.node_id and a.public_key == b.public_key
    assert a.node_id == hashlib.sha1(a.public_key).digest() and len(a.node_id) == 20
    sig = a.sign(b"hello")
    b.public().verify(sig, b"hello")  # raises if wrong


def test_world_readable_key_refused(tmp_path):
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


def test_corrupt_key_refused(tmp_path):
    p = tmp_path / "identity.key"
    p.write_bytes(b"short")
    os.chmod(p, 0o600)
    with pytest.raises(IdentityError, match="32-byte"):
        Identity.load_or_create(tmp_path)


def test_generate_distinct():
    assert Identity.generate().node_id != Identity.generate().node_id
