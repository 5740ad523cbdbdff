"""Endpoint ownership proofs (SPEC §5, ``GET /.well-known/rma-agent/proof?nonce=HEX``).

A record's ``endpoint`` is just a string the worker signed: nothing stops a worker from
announcing somebody else's URL (to collect the traffic's failures for a rival, or to point
callers at a host it wants to flood). Before a caller sends work to an endpoint it asks
that endpoint to sign a fresh nonce together with the endpoint itself, and checks the
signature against the public key in the record it came from. Only the box holding the
record's private key, reachable at that URL, can answer.

The signed message is ``PROOF_DOMAIN || nonce || endpoint`` (UTF-8): the domain keeps a
proof from ever being valid as a record signature or any other signed message, and binding
the endpoint stops a proof fetched from one URL being replayed for another.

The answer is JSON: ``{"worker_id": hex, "public_key": base64, "endpoint": str,
"signature": base64}``. This module is the one place that defines it; the gateway signs
through ``make_proof`` and callers check through ``verify_proof``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

if TYPE_CHECKING:
    from agent.dht.identity import Identity

PROOF_PATH = "/.well-known/rma-agent/proof"
PROOF_DOMAIN = b"rma-agent/endpoint-proof/v1\x00"
NONCE_MIN_BYTES = 16
NONCE_MAX_BYTES = 64


class ProofError(ValueError):
    """A nonce or a proof answer is malformed or does not verify."""


def new_nonce() -> str:
    """A fresh 32-byte nonce, hex-encoded, as a caller puts it in the query string."""
    return os.urandom(32).hex()


def parse_nonce(text: str) -> bytes:
    """The nonce bytes of a ``nonce=`` query value; ProofError when it is not 16-64 bytes
    of hex (short nonces could be pre-computed, long ones cost the signer for nothing)."""
    if not isinstance(text, str) or not (2 * NONCE_MIN_BYTES <= len(text) <= 2 * NONCE_MAX_BYTES):
        raise ProofError(f"nonce must be {NONCE_MIN_BYTES}-{NONCE_MAX_BYTES} bytes of hex")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProofError("nonce must be hex") from None


def _message(nonce: bytes, endpoint: str) -> bytes:
    return PROOF_DOMAIN + nonce + endpoint.encode("utf-8")


def make_proof(identity: Identity, nonce: bytes, endpoint: str) -> dict[str, Any]:
    """The JSON body the gateway answers with."""
    return {
        "worker_id": identity.node_id.hex(),
        "public_key": base64.b64encode(identity.public_key).decode("ascii"),
        "endpoint": endpoint,
        "signature": base64.b64encode(identity.sign(_message(nonce, endpoint))).decode("ascii"),
    }


def verify_proof(answer: object, *, public_key: bytes, nonce: bytes, endpoint: str) -> None:
    """Raise ProofError unless ``answer`` proves that the holder of ``public_key`` (the
    record's key) answers at ``endpoint`` (the record's endpoint) for this ``nonce``."""
    if not isinstance(answer, dict):
        raise ProofError("proof answer is not a JSON object")
    try:
        pk = base64.b64decode(answer["public_key"], validate=True)
        sig = base64.b64decode(answer["signature"], validate=True)
        worker_id = bytes.fromhex(answer["worker_id"])
        claimed_endpoint = answer["endpoint"]
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ProofError("proof answer lacks worker_id, public_key, endpoint or signature") from None
    if pk != public_key:
        raise ProofError("proof is signed by another key than the record's")
    if worker_id != hashlib.sha1(public_key).digest():
        raise ProofError("proof worker_id does not match the record's key")
    if claimed_endpoint != endpoint:
        raise ProofError("proof names another endpoint than the record's")
    if len(sig) != 64:
        raise ProofError("proof signature must be 64 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, _message(nonce, endpoint))
    except (InvalidSignature, ValueError):
        raise ProofError("proof signature does not verify") from None
