"""The node's Ed25519 identity (SPEC §6).

One key per installation, created at first start in ``state_dir`` and reused after
restarts, so a worker keeps its worker id (= node id = SHA-1 of the public key) and its
records stay attributable to it.

The node id is tied to the key on the wire too (``node_id_proof`` / ``proven_node_id``):
a contact enters a routing table only after answering the ``identify`` RPC with its
public key and a signature over the asker's fresh nonce and its id, so a peer cannot
claim an id next to a key it wants to eclipse; it must grind keys for it (see
``liveness``). The private key is stored raw (32 bytes) in
``identity.key`` with mode 0600; a key file that other users can read is refused rather
than silently used, because anyone holding it can forge this worker's records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agent.fsutil import PrivateFileError, read_private_file, write_atomic

KEY_FILE = "identity.key"
NODE_ID_DOMAIN = b"rma-agent/node-id/v1\x00"   # signatures of node-id proofs only
NONCE_MIN, NONCE_MAX = 16, 32


class IdentityError(Exception):
    """The identity key cannot be loaded or created (bad permissions, corrupt file)."""


def node_id_of(public_key: bytes) -> bytes:
    """Node/worker id of a raw Ed25519 public key: SHA-1, 20 bytes (Kademlia's id space)."""
    return hashlib.sha1(public_key).digest()


def proven_node_id(answer: Any, nonce: bytes) -> bytes | None:
    """The node id an ``identify`` answer proves for ``nonce`` (SHA-1 of the key it
    carries, signed over the nonce and that id), or None when it proves nothing."""
    if not (isinstance(answer, dict) and type(answer.get("key")) is bytes
            and type(answer.get("sig")) is bytes and len(answer["key"]) == 32
            and len(answer["sig"]) == 64):
        return None
    node_id = node_id_of(answer["key"])
    try:
        Ed25519PublicKey.from_public_bytes(answer["key"]).verify(
            answer["sig"], NODE_ID_DOMAIN + nonce + node_id)
    except (InvalidSignature, ValueError):
        return None
    return node_id


class Identity:
    """An Ed25519 key pair plus the derived 20-byte node id."""

    __slots__ = ("_private", "node_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self.node_id: bytes = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests, benchmarks)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != 32:
            raise IdentityError(f"private key must be 32 raw bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, state_dir: Path | str) -> Identity:
        """Load ``state_dir/identity.key`` or create it (dir 0700, file 0600).

        Raises ``IdentityError`` with a human-readable reason when the file is
        readable by group/others, has the wrong size, or cannot be written.
        """
        state_dir = Path(state_dir)
        path = state_dir / KEY_FILE
        try:
            if not state_dir.exists():
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.exists():
                return cls._load(path)
            return cls._create(path)
        except IdentityError:
            raise
        except OSError as exc:
            raise IdentityError(f"{path}: {exc.strerror or exc}") from exc

    @classmethod
    def _load(cls, path: Path) -> Identity:
        try:
            raw = read_private_file(path, "private key", 1024)
        except PrivateFileError as exc:
            raise IdentityError(str(exc)) from None
        if len(raw) != 32:
            raise IdentityError(f"{path}: expected a 32-byte raw Ed25519 key, found {len(raw)} bytes")
        return cls.from_private_bytes(raw)

    @classmethod
    def _create(cls, path: Path) -> Identity:
        ident = cls.generate()
        raw = ident._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        # created 0600 from the start: the key never exists on disk with wider permissions
        write_atomic(path, raw, mode=0o600)
        return ident

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of ``data``."""
        return self._private.sign(data)

    def node_id_proof(self, nonce: bytes) -> dict[str, bytes]:
        """The ``identify`` answer: our public key and a signature over the asker's
        nonce and our node id (domain-separated from records and endpoint proofs)."""
        return {"key": self.public_key, "sig": self.sign(NODE_ID_DOMAIN + nonce + self.node_id)}

    def public(self) -> Ed25519PublicKey:
        return self._private.public_key()

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id.hex()})"
