#!/bin/sh
# Runs INSIDE the release's build root filesystem (chroot by build-deb.sh), with the sources
# at /src (a copy), an empty /opt/rma-agent, the pip cache at /var/cache/pip. Builds the
# self-contained virtualenv at its final path with the release's own /usr/bin/python3 and
# leaves facts for the package's Depends in /src/.needed-packages, .glibc-version,
# .python3-version, .python3-minor and the bundled versions in /src/.bundled.
set -eu
[ -f /src/.host-ca.crt ] && export PIP_CERT=/src/.host-ca.crt SSL_CERT_FILE=/src/.host-ca.crt
export HOME=/tmp PIP_CACHE_DIR=/var/cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1 \
       PIP_NO_INPUT=1 RMA_AGENT_REQUIRE_EXT=1 LC_ALL=C.UTF-8 SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
/usr/bin/python3 -m venv /opt/rma-agent
# Wheelhouse: every wheel the build needs (build requirements from [build-system], the
# project's dependencies, sdists built once into wheels), kept per dependency set in the
# cache. Re-builds install from it offline, so they neither depend on PyPI being reachable
# nor pick up new upstream releases behind our back; --refresh-wheels re-downloads.
wh=/var/cache/wheelhouse/$WHEELHOUSE_KEY
if [ "${REFRESH_WHEELS:-0}" = 1 ] || [ ! -f "$wh/.complete" ]; then
    rm -rf "$wh"
    mkdir -p "$wh"
    /usr/bin/python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["build-system"]["requires"]))' > /tmp/build-requires.txt
    /opt/rma-agent/bin/pip download --quiet -d "$wh" -r /tmp/build-requires.txt
    /opt/rma-agent/bin/pip wheel --quiet --use-pep517 -w "$wh" /src
    rm -f "$wh"/rma_agent-*.whl
    touch "$wh/.complete"
    echo "build: wheelhouse refreshed: $(ls "$wh" | wc -l) wheels"
fi
# This release's other dependency sets' wheelhouses are stale (the key starts with the
# release: wheels of compiled dependencies are built for that release's Python).
find /var/cache/wheelhouse -mindepth 1 -maxdepth 1 -name "${WHEELHOUSE_KEY%%-*}-*" ! -name "$WHEELHOUSE_KEY" -exec rm -rf {} +
/opt/rma-agent/bin/pip install --quiet --no-compile --use-pep517 --no-index --find-links "$wh" /src
# The kernels must be the compiled ones (RMA_AGENT_REQUIRE_EXT=1 already fails the build
# otherwise); check from outside the source tree so the import cannot pick up /src.
cd /
/opt/rma-agent/bin/python3 - <<'PY'
import _fast, agent, sys
impl = getattr(_fast, "IMPLEMENTATION", "?")
print(f"build: agent {getattr(agent, '__version__', '?')} on Python {sys.version.split()[0]}, _fast={impl}")
if impl != "cython":
    sys.exit(f"build: _fast is {impl!r}: {getattr(_fast, 'FALLBACK_REASON', '')}")
PY
/opt/rma-agent/bin/rma-agent --version
# Record what is bundled (name==version), for audits and security updates.
/opt/rma-agent/bin/pip freeze --all --exclude pip --exclude setuptools \
    | sed "s|^rma-agent @ .*|rma-agent (this package)|" > /src/.bundled
# pip and setuptools are build tools, not runtime ones: the package is upgraded as a
# whole by dpkg, never by pip inside it.
/opt/rma-agent/bin/pip uninstall --quiet -y pip setuptools
find /opt/rma-agent -name __pycache__ -type d -prune -exec rm -rf {} +
# Only the interpreter links and our entry point stay in bin/: the activate scripts and the
# dependencies' console scripts are not part of the product. Generated C is not needed
# next to the compiled kernels (the .pyx sources stay, as package data).
find /opt/rma-agent/bin -mindepth 1 ! -name 'python*' ! -name rma-agent -exec rm -f {} +
rm -rf /opt/rma-agent/include
# Python >= 3.13's venv writes a .gitignore into the venv: not part of a package.
rm -f /opt/rma-agent/.gitignore
find /opt/rma-agent/lib -path '*/site-packages/_fast/*.c' -delete
# Wheels from PyPI carry debug symbols; Debian packages ship stripped objects.
find /opt/rma-agent -type f -name '*.so*' -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
# Which shared libraries outside the venv the ELF objects need -> Debian packages.
find /opt/rma-agent -type f -name '*.so*' | while read -r so; do
    ldd "$so" 2>/dev/null | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
    dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || echo "unknown: $lib"
done | cut -d: -f1 | sort -u > /src/.needed-packages
find /opt/rma-agent -type f -name '*.so*' -exec objdump -T {} + 2>/dev/null \
    | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1 > /src/.glibc-version
dpkg-query -W -f='${Version}' python3 > /src/.python3-version
/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' > /src/.python3-minor
