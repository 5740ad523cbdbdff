#!/bin/bash
# Build dist/rma-agent_<version>_amd64.deb for Debian 12 "bookworm".
#
#   sudo bash packaging/build-deb.sh [--if-changed] [--no-lintian] [--out DIR]
#
# Why a chroot: the package ships a self-contained virtualenv under /opt/rma-agent whose
# interpreter is the target's /usr/bin/python3 (3.11 on bookworm) and whose _fast kernels
# are compiled against that Python. A venv made with the host's Python (3.13 on trixie)
# would not run on bookworm, so the venv is built inside a cached bookworm root filesystem
# (packaging/rootfs.sh build), at its final path /opt/rma-agent (no relocation), with the
# source copied in. pip's wheel cache lives in $CACHE/pip so re-builds need no download.
#
# --if-changed   do nothing when the .deb in --out was built from identical inputs (a hash
#                of the packaged sources is kept next to it); what the tests call.
# --refresh-wheels  re-download the cached wheelhouse (e.g. for dependency security fixes;
#                it is otherwise reused while pyproject.toml and setup.py are unchanged).
# --no-lintian   skip lintian (it is run by default; any lintian error fails the build).
# Needs root (chroot, bind mounts) and: debootstrap, dpkg-deb, lintian (packaging/deps.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
out="$src/dist"
if_changed=0
run_lintian=1
refresh_wheels=0
while [ $# -gt 0 ]; do
    case "$1" in
        --if-changed) if_changed=1 ;;
        --no-lintian) run_lintian=0 ;;
        --refresh-wheels) refresh_wheels=1 ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
cache=${RMA_BUILD_CACHE:-/var/cache/rma-agent-build}
[ "$(id -u)" = 0 ] || { echo "build-deb.sh: needs root (chroot + bind mounts)" >&2; exit 1; }

upstream=$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$src/pyproject.toml" | head -n1)
[ -n "$upstream" ] || { echo "build-deb.sh: no version in pyproject.toml" >&2; exit 1; }
revision=1
version="$upstream-$revision"
arch=amd64
deb="$out/rma-agent_${version}_${arch}.deb"

# The exact inputs of the package: tracked and untracked-but-not-ignored files of the
# Python project, plus the packaging, units and shipped config.
cd "$src"
mapfile -t inputs < <(git ls-files -co --exclude-standard -- \
    agent _fast setup.py pyproject.toml README.md config/agent.toml systemd packaging \
    | grep -v -e '__pycache__' -e '\.pyc$' | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done)
inputs_hash=$( (printf '%s\n' "$version"; for f in "${inputs[@]}"; do printf '%s\n' "$f"; sha256sum < "$f"; done) | sha256sum | cut -d' ' -f1)
stampfile="$out/.rma-agent_${version}_${arch}.inputs"
if [ "$if_changed" = 1 ] && [ -f "$deb" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$inputs_hash" ]; then
    echo "build-deb.sh: $deb is up to date"
    exit 0
fi

# One build per output directory at a time (CI jobs, test fixtures and people share dist/).
mkdir -p "$out"
exec 8>"$out/.build.lock"
flock 8
if [ "$if_changed" = 1 ] && [ -f "$deb" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$inputs_hash" ]; then
    echo "build-deb.sh: $deb is up to date (built meanwhile)"
    exit 0
fi
t0=$(date +%s)
root=$(bash "$here/rootfs.sh" build)
mkdir -p "$cache/pip" "$out"
work=$(mktemp -d /var/tmp/rma-agent-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/venv" "$work/tmp" "$work/pkg"
chmod 1777 "$work/tmp"
# Copy (not bind) the sources: pip builds local projects in-tree, and the build must not
# leave artefacts in the shared checkout. Python files only; no caches or host-built .so.
tar -C "$src" -cf - "${inputs[@]}" | tar -C "$work/src" -xf -
[ -f "$work/src/README.md" ] || echo "rma-agent" > "$work/src/README.md"
# Trust what the host trusts (an egress proxy may re-sign TLS with its own CA) and use the
# host's proxy settings, so pip in the chroot reaches PyPI exactly as pip on the host does.
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$host_ca" ] && cp -L "$host_ca" "$work/src/.host-ca.crt"
proxy_env=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL; do
    [ -n "${!v:-}" ] && proxy_env+=("$v=${!v}")
done
# Mount points inside the cached root filesystem (empty dirs; the mounts are private).
mkdir -p "$root/src" "$root/opt/rma-agent" "$root/var/cache/pip"
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true

cat > "$work/src/.inchroot.sh" <<'INNER'
set -eu
[ -f /src/.host-ca.crt ] && export PIP_CERT=/src/.host-ca.crt SSL_CERT_FILE=/src/.host-ca.crt
export HOME=/tmp PIP_CACHE_DIR=/var/cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1 \
       PIP_NO_INPUT=1 RMA_AGENT_REQUIRE_EXT=1 LC_ALL=C.UTF-8 SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
/usr/bin/python3 -m venv /opt/rma-agent
# Wheelhouse: every wheel the build needs (build requirements from [build-system], the
# project's dependencies, sdists built once into wheels), kept per dependency set in the
# cache. Re-builds install from it offline, so they neither depend on PyPI being reachable
# nor pick up new upstream releases behind our back; --refresh-wheels re-downloads.
wh=/var/cache/pip/wheelhouse/$WHEELHOUSE_KEY
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
# Other dependency sets' wheelhouses are stale.
find /var/cache/pip/wheelhouse -mindepth 1 -maxdepth 1 ! -name "$WHEELHOUSE_KEY" -exec rm -rf {} +
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
INNER

echo "build-deb.sh: building the venv in $root (chroot)"
unshare -m --propagation private sh -ec '
    root=$1; work=$2; cache=$3
    mount --bind "$work/src" "$root/src"
    mount --bind "$work/venv" "$root/opt/rma-agent"
    mount --bind "$work/tmp" "$root/tmp"
    mount --bind "$cache/pip" "$root/var/cache/pip"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    shift 3
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@" /bin/sh /src/.inchroot.sh
' sh "$root" "$work" "$cache" "${proxy_env[@]}" \
    "WHEELHOUSE_KEY=$(cat "$src/pyproject.toml" "$src/setup.py" | sha256sum | cut -c1-16)" \
    "REFRESH_WHEELS=$refresh_wheels"

# ---- assemble the package tree ----
pkg="$work/pkg"
umask 022
install -d "$pkg/DEBIAN" "$pkg/opt" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
    "$pkg/usr/lib/rma-agent" "$pkg/etc/rma-agent" "$pkg/etc/default" \
    "$pkg/usr/share/doc/rma-agent" "$pkg/usr/share/lintian/overrides"
cp -a "$work/venv" "$pkg/opt/rma-agent"
# Normalise modes: a tree extracted by pip may carry odd bits; root owns all (--root-owner-group).
find "$pkg/opt/rma-agent" -type d -exec chmod 0755 {} +
find "$pkg/opt/rma-agent" -type f -exec chmod u+rw,go+r,go-w {} +
ln -s /opt/rma-agent/bin/rma-agent "$pkg/usr/bin/rma-agent"
install -m 0644 "$src/systemd/rma-agent.service" "$src/systemd/rma-tunnel.service" "$pkg/lib/systemd/system/"
install -m 0755 "$src/systemd/rma-tunnel" "$pkg/usr/lib/rma-agent/rma-tunnel"
install -m 0644 "$src/config/agent.toml" "$pkg/etc/rma-agent/agent.toml"
install -m 0644 "$here/debian/default" "$pkg/etc/default/rma-agent"
install -m 0644 "$here/debian/copyright" "$pkg/usr/share/doc/rma-agent/copyright"
install -m 0644 "$here/debian/README.Debian" "$pkg/usr/share/doc/rma-agent/README.Debian"
gzip -9n < "$here/debian/changelog" > "$pkg/usr/share/doc/rma-agent/changelog.Debian.gz"
install -m 0644 "$work/src/.bundled" "$pkg/usr/share/doc/rma-agent/bundled-python-packages.txt"
install -d "$pkg/usr/share/man/man1"
gzip -9n < "$here/debian/rma-agent.1" > "$pkg/usr/share/man/man1/rma-agent.1.gz"
chmod 0644 "$pkg/usr/share/man/man1/rma-agent.1.gz"
install -m 0644 "$here/debian/lintian-overrides" "$pkg/usr/share/lintian/overrides/rma-agent"
for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$pkg/DEBIAN/$s"; done
install -m 0644 "$here/debian/conffiles" "$pkg/DEBIAN/conffiles"

# Depends: the interpreter the venv links to (bookworm's 3.11 exactly), what the maintainer
# scripts and units use, and the system libraries the compiled modules link against.
glibc=$(cat "$work/src/.glibc-version")
libdeps=""
while read -r p; do
    case "$p" in
        libc6) ;;                                  # versioned below
        libpython3*|python3*) ;;                   # covered by python3 (>= 3.11)
        unknown*) echo "build-deb.sh: unresolved library: $p" >&2; exit 1 ;;
        *) libdeps="$libdeps, $p" ;;
    esac
done < "$work/src/.needed-packages"
# procps: /bin/kill for ExecReload= (not in a minimal bookworm).
depends="python3 (>= 3.11), python3 (<< 3.12), libc6 (>= ${glibc:-2.36})${libdeps}, adduser, procps, systemd, init-system-helpers (>= 1.54~)"
installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" \
    -e "s/@INSTALLED_SIZE@/$installed_size/" "$here/debian/control.in" > "$pkg/DEBIAN/control"
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums"

rm -f "$deb" "$stampfile"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "build-deb.sh: built $deb ($(du -h "$deb" | cut -f1), $(($(date +%s) - t0)) s)"
echo "build-deb.sh: Depends: $depends"

if [ "$run_lintian" = 1 ]; then
    if command -v lintian >/dev/null; then
        # --fail-on error: warnings are reported but only errors fail the build.
        lintian --fail-on error "$deb" || {
            echo "build-deb.sh: lintian reported errors" >&2; exit 1; }
        echo "build-deb.sh: lintian: no errors"
    else
        echo "build-deb.sh: lintian not installed; skipped (packaging/deps.sh)" >&2
    fi
fi
printf '%s' "$inputs_hash" > "$stampfile"
