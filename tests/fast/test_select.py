"""Which implementation ``_fast`` picks, and how it says so (fresh interpreters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _fast

ROOT = Path(_fast.__file__).resolve().parent.parent

PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")
{pre}
import _fast
_fast.warn_fallback_once()
_fast.warn_fallback_once()
print(json.dumps({{"impl": _fast.IMPLEMENTATION, "reason": _fast.FALLBACK_REASON,
                   "stats": _fast.stats(), "k": _fast.k_closest(bytes(20), bytes(60), 2)}}))
"""


def probe(pre: str = "", **env: str) -> tuple[dict, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("RMA_AGENT_PURE",)}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_missing_extension_falls_back_and_logs_once():
    # Make the compiled modules unimportable, as on a box built without a compiler.
    out, err = probe("sys.modules['_fast._xor'] = None; sys.modules['_fast._score'] = None")
    assert out["impl"] == "python"
    assert "_fast._xor" in out["reason"] or "_fast._score" in out["reason"]
    assert out["stats"] == {"kernels": "python", "kernels_fallback_reason": out["reason"]}
    assert out["k"] == [0, 1]  # and it works
    lines = [ln for ln in err.splitlines() if ln.startswith("LOG rma_agent.fast WARNING")]
    assert len(lines) == 1, err
    assert "pure-Python" in lines[0]


def test_forced_pure_is_not_a_warning():
    out, err = probe(RMA_AGENT_PURE="1")
    assert out["impl"] == "python"
    assert out["reason"] == "RMA_AGENT_PURE=1"
    assert "rma_agent.fast" not in err


@pytest.mark.skipif(_fast.compiled is None, reason="Cython kernels not built")
def test_compiled_is_the_default():
    out, err = probe()
    assert out["impl"] == "cython"
    assert out["reason"] is None
    assert "rma_agent.fast" not in err


@pytest.mark.skipif(os.environ.get("RMA_AGENT_REQUIRE_EXT") != "1",
                    reason="only enforced when RMA_AGENT_REQUIRE_EXT=1 (CI, .deb build)")
def test_extension_required():
    assert _fast.compiled is not None, f"compiled kernels required: {_fast.COMPILED_ERROR}"
    assert _fast.compiled.k_closest(bytes(20), bytes(40), 1) == [0]
