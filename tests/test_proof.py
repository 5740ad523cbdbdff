"""Endpoint ownership proofs: a proof verifies only for the key, nonce and endpoint signed."""

from __future__ import annotations

import pytest

from agent.dht.identity import Identity
from agent.proof import ProofError, make_proof, new_nonce, parse_nonce, verify_proof

EP = "https://a.example.org"


def test_roundtrip_and_every_binding() -> None:
    ident, other = Identity.generate(), Identity.generate()
    nonce = parse_nonce(new_nonce())
    ans = make_proof(ident, nonce, EP)
    verify_proof(ans, public_key=ident.public_key, nonce=nonce, endpoint=EP)
    with pytest.raises(ProofError, match="another key"):
        verify_proof(ans, public_key=other.public_key, nonce=nonce, endpoint=EP)
    with pytest.raises(ProofError, match="does not verify"):
        verify_proof(ans, public_key=ident.public_key, nonce=bytes(32), endpoint=EP)
    with pytest.raises(ProofError, match="another endpoint"):
        verify_proof(ans, public_key=ident.public_key, nonce=nonce, endpoint=EP + "/x")
    # a proof made by another key for the same endpoint, relabelled with the victim's key
    forged = dict(make_proof(other, nonce, EP), public_key=ans["public_key"],
                  worker_id=ans["worker_id"])
    with pytest.raises(ProofError, match="does not verify"):
        verify_proof(forged, public_key=ident.public_key, nonce=nonce, endpoint=EP)


@pytest.mark.parametrize("bad", [None, [], {}, {"public_key": "!!"},
                                 {"worker_id": "zz", "public_key": "", "endpoint": EP,
                                  "signature": ""}])
def test_malformed_answers_are_proof_errors(bad: object) -> None:
    with pytest.raises(ProofError):
        verify_proof(bad, public_key=bytes(32), nonce=bytes(32), endpoint=EP)


@pytest.mark.parametrize("text", ["", "ab", "zz" * 16, "0" * 129, "0" * 31])
def test_bad_nonces(text: str) -> None:
    with pytest.raises(ProofError):
        parse_nonce(text)
