#!/usr/bin/env bash
# Set up .venv and run a local cluster (one coordinator, N workers) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rma-agent demo "$@"
