#!/usr/bin/env bash
# Set up everything the test suite needs (apt packages when root, .venv, kernels) and run it.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m 'not nspawn' -x
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ -f packaging/deps.sh ]; then
  bash packaging/deps.sh          # debootstrap, systemd-container, lintian, ... (idempotent)
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
