#!/usr/bin/env bash
# Set up everything the test suite needs (apt packages when root, .venv, kernels) and run it.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m 'not slow' -x
#
# scripts/setup.sh (pip: ~25 s, and it asks PyPI) runs when .venv is missing or what it
# installs from changed since it last ran here (pyproject.toml, setup.py, setup.sh: their
# hash is kept in .venv/.setup-stamp); otherwise only the kernels are rebuilt, which is a
# no-op when _fast/ is unchanged. A clean clone (CI) always runs the whole setup.
#
# The suite runs on RMA_TEST_WORKERS pytest-xdist processes (default 2, one per core of the
# machines it is made for; 0 runs it in this process). Tests that share a machine-wide
# resource are kept on one worker by tests/conftest.py's groups (--dist loadfile).
# Later arguments win: `bash scripts/test.sh -n 0 tests/dht` runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ -f packaging/deps.sh ]; then
  bash packaging/deps.sh          # debootstrap, systemd-container, lintian, ... (idempotent)
fi
stamp=.venv/.setup-stamp
inputs=$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  RMA_AGENT_REQUIRE_EXT=1 .venv/bin/python setup.py -q build_ext --inplace
  .venv/bin/python -c 'import _fast; print("kernels:", _fast.IMPLEMENTATION)'
else
  bash scripts/setup.sh
  echo "$inputs" > "$stamp"
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n "${RMA_TEST_WORKERS:-2}" --dist loadfile "$@"
