#!/usr/bin/env bash
# Create .venv with the project installed (editable) and its Cython kernels compiled.
# Works on a fresh Debian 12 with Python 3.11; installs python3-venv/gcc when root and missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null || ! command -v gcc >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq python3-venv python3-dev gcc >/dev/null
  else
    echo "need python3-venv, python3-dev and gcc: sudo apt-get install python3-venv python3-dev gcc" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cython
.venv/bin/python -m pip install -q -e '.[test]'
# Compile _fast in place (the editable install points at this tree); fail loudly if it cannot.
RMA_AGENT_REQUIRE_EXT=1 .venv/bin/python setup.py -q build_ext --inplace
.venv/bin/python -c 'import _fast; print("kernels:", _fast.IMPLEMENTATION)'
