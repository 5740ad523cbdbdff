#!/bin/bash
# Build dist/rma-agent_<version>_amd64.deb for Debian 12 "bookworm" and/or 13 "trixie".
#
#   sudo bash packaging/build-deb.sh [--release bookworm|trixie|all] [--revision N]
#                                    [--if-changed] [--no-lintian] [--out DIR]
#
# Versions: <upstream>-<revision>~deb<NN>u1, e.g. 0.2.0-1~deb12u1 and 0.2.0-1~deb13u1.
# "~debNN" sorts below the plain revision and deb12 below deb13, so a box upgraded from
# bookworm to trixie moves to the trixie build, and a later revision (0.2.0-2~deb12u1)
# upgrades both. --revision N (default 1) is the Debian revision: a packaging-only update,
# or the "N+1" the upgrade test installs over N (same tree, new version).
#
# Why a chroot: the package ships a self-contained virtualenv under /opt/rma-agent whose
# interpreter is the target's /usr/bin/python3 (3.11 on bookworm, 3.13 on trixie) and whose
# _fast kernels are compiled against that Python. So the venv is built inside a cached root
# filesystem of the target release (packaging/rootfs.sh build RELEASE), at its final path
# /opt/rma-agent (no relocation), by packaging/venv-in-chroot.sh.
#
# Two caches under $RMA_BUILD_CACHE (default /var/cache/rma-agent-build):
#   venv/<release>/   the built venv + facts for Depends, keyed by a hash of what it is made
#                     of (Python sources, pyproject/setup.py, the chroot script, the root
#                     filesystem's package set). Assembling a package from it (units,
#                     conffiles, control with the version) takes seconds, so a new revision
#                     or a change to packaging/ or systemd/ does not rebuild the venv.
#   pip/, wheelhouse/ pip's cache; per-release wheelhouses (offline re-builds).
#   rootfs/           the releases' root filesystems (packaging/rootfs.sh).
#
# --release R    bookworm, trixie or all (default all: both, one after the other)
# --revision N   Debian revision (default 1)
# --if-changed   do nothing for a release whose .deb in --out was built from identical inputs
#                (a hash of the packaged sources and the version is kept next to it).
# --refresh-wheels  re-download the cached wheelhouse (e.g. for dependency security fixes;
#                it is otherwise reused while pyproject.toml and setup.py are unchanged).
# --no-lintian   skip lintian (it is run by default; any lintian error fails the build).
# Needs root (chroot, bind mounts) and: debootstrap, dpkg-deb, lintian (packaging/deps.sh).
set -euo pipefail
shopt -s inherit_errexit   # failures inside $(build_venv ...) stop the build

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
out="$src/dist"
if_changed=0
run_lintian=1
refresh_wheels=0
release=all
revision=1
while [ $# -gt 0 ]; do
    case "$1" in
        --if-changed) if_changed=1 ;;
        --no-lintian) run_lintian=0 ;;
        --refresh-wheels) refresh_wheels=1 ;;
        --out) out=$2; shift ;;
        --release) release=$2; shift ;;
        --revision) revision=$2; shift ;;
        -h|--help) sed -n '2,35p' "$0" | cut -c3-; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case "$release" in
    all|both) releases="bookworm trixie" ;;
    bookworm|trixie) releases=$release ;;
    *) echo "build-deb.sh: unknown release '$release' (bookworm|trixie|all)" >&2; exit 2 ;;
esac
case "$revision" in
    [1-9]|[1-9][0-9]|[1-9][0-9][0-9]) ;;
    *) echo "build-deb.sh: --revision must be a number 1..999, not '$revision'" >&2; exit 2 ;;
esac
cache=${RMA_BUILD_CACHE:-/var/cache/rma-agent-build}
[ "$(id -u)" = 0 ] || { echo "build-deb.sh: needs root (chroot + bind mounts)" >&2; exit 1; }

upstream=$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$src/pyproject.toml" | head -n1)
[ -n "$upstream" ] || { echo "build-deb.sh: no version in pyproject.toml" >&2; exit 1; }
pkgver=$(sed -n '1s/^[^(]*(\([^)-]*\)-.*/\1/p' "$here/debian/changelog")
[ "$pkgver" = "$upstream" ] || {
    echo "build-deb.sh: debian/changelog's top entry is $pkgver, pyproject.toml says $upstream" >&2; exit 1; }
arch=amd64

# The exact inputs: tracked and untracked-but-not-ignored files. venv_inputs make the
# virtualenv; pkg_inputs (a superset) make the package around it.
cd "$src"
list_inputs() {
    git ls-files -co --exclude-standard -- "$@" \
        | grep -v -e '__pycache__' -e '\.pyc$' | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done
}
hash_files() { for f in "$@"; do printf '%s\n' "$f"; sha256sum < "$f"; done; }
mapfile -t venv_inputs < <(list_inputs agent _fast setup.py pyproject.toml README.md packaging/venv-in-chroot.sh)
mapfile -t pkg_inputs < <(list_inputs agent _fast setup.py pyproject.toml README.md config/agent.toml systemd packaging)
mkdir -p "$out"

# ---- stage 1: the virtualenv for one release (cached) ----
# Prints the cache directory holding tree/ (the venv) and the facts files.
build_venv() {
    local rel=$1 root key dir work
    root=$(bash "$here/rootfs.sh" build "$rel")
    key=$( (printf '%s\n' "$rel"; cat "$root/.complete"; echo; hash_files "${venv_inputs[@]}") | sha256sum | cut -c1-24)
    dir="$cache/venv/$rel"
    mkdir -p "$cache/venv"
    exec 7>"$cache/.lock-venv-$rel"
    flock 7
    if [ "$refresh_wheels" = 0 ] && [ "$(cat "$dir/key" 2>/dev/null)" = "$key" ] && [ -d "$dir/tree" ]; then
        echo "build-deb.sh: $rel: venv cached ($dir)" >&2
        exec 7>&-
        echo "$dir"
        return
    fi
    mkdir -p "$cache/pip" "$cache/wheelhouse"
    work=$(mktemp -d /var/tmp/rma-agent-venv.XXXXXX)
    mkdir -p "$work/src" "$work/venv" "$work/tmp"
    chmod 1777 "$work/tmp"
    # Copy (not bind) the sources: pip builds local projects in-tree, and the build must not
    # leave artefacts in the shared checkout. Python files only; no caches or host-built .so.
    tar -C "$src" -cf - "${venv_inputs[@]}" | tar -C "$work/src" -xf -
    [ -f "$work/src/README.md" ] || echo "rma-agent" > "$work/src/README.md"
    # Trust what the host trusts (an egress proxy may re-sign TLS with its own CA) and use
    # the host's proxy settings, so pip in the chroot reaches PyPI as pip on the host does.
    local host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [ -f "$host_ca" ] && cp -L "$host_ca" "$work/src/.host-ca.crt"
    local proxy_env=() v
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL; do
        [ -n "${!v:-}" ] && proxy_env+=("$v=${!v}")
    done
    # Mount points inside the cached root filesystem (empty dirs; the mounts are private).
    mkdir -p "$root/src" "$root/opt/rma-agent" "$root/var/cache/pip" "$root/var/cache/wheelhouse"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    echo "build-deb.sh: $rel: building the venv in $root (chroot)" >&2
    local t0; t0=$(date +%s)
    unshare -m --propagation private sh -ec '
        root=$1; work=$2; cache=$3
        mount --bind "$work/src" "$root/src"
        mount --bind "$work/venv" "$root/opt/rma-agent"
        mount --bind "$work/tmp" "$root/tmp"
        mount --bind "$cache/pip" "$root/var/cache/pip"
        mount --bind "$cache/wheelhouse" "$root/var/cache/wheelhouse"
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        shift 3
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@" /bin/sh /src/packaging/venv-in-chroot.sh
    ' sh "$root" "$work" "$cache" "${proxy_env[@]}" \
        "WHEELHOUSE_KEY=$rel-$(cat "$src/pyproject.toml" "$src/setup.py" | sha256sum | cut -c1-16)" \
        "REFRESH_WHEELS=$refresh_wheels" >&2 || { rm -rf "$work"; return 1; }
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$work/venv" "$dir/tree"
    for v in .needed-packages .glibc-version .python3-version .python3-minor .bundled; do
        mv "$work/src/$v" "$dir/${v#.}"
    done
    rm -rf "$work"
    printf '%s' "$key" > "$dir/key"
    echo "build-deb.sh: $rel: venv built in $(($(date +%s) - t0)) s" >&2
    exec 7>&-
    echo "$dir"
}

# ---- stage 2: the package around it ----
build_one() {
    local rel=$1 nn codename_long
    case "$rel" in
        bookworm) nn=12 ;;
        trixie) nn=13 ;;
    esac
    codename_long="Debian $nn ($rel)"
    local version="$upstream-$revision~deb${nn}u1"
    local deb="$out/rma-agent_${version}_${arch}.deb"
    local stampfile="$out/.rma-agent_${version}_${arch}.inputs"
    local inputs_hash
    inputs_hash=$( (printf '%s\n%s\n' "$version" "$rel"; hash_files "${pkg_inputs[@]}") | sha256sum | cut -d' ' -f1)
    if [ "$if_changed" = 1 ] && [ -f "$deb" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$inputs_hash" ]; then
        echo "build-deb.sh: $deb is up to date"
        return
    fi
    local t0 vdir work pkg
    t0=$(date +%s)
    vdir=$(build_venv "$rel")
    # One assembly per output directory at a time (CI, test fixtures and people share dist/).
    exec 8>"$out/.build.lock"
    flock 8
    # Another caller (a second pytest-xdist worker, a CI job) may have built these very
    # inputs while we waited: rebuilding would delete a package it may be installing now.
    if [ "$if_changed" = 1 ] && [ -f "$deb" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$inputs_hash" ]; then
        echo "build-deb.sh: $deb is up to date (built while we waited for the lock)"
        exec 8>&-
        return
    fi
    work=$(mktemp -d /var/tmp/rma-agent-build.XXXXXX)
    pkg="$work/pkg"
    umask 022
    install -d "$pkg/DEBIAN" "$pkg/opt" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
        "$pkg/usr/lib/rma-agent" "$pkg/etc/rma-agent" "$pkg/etc/default" \
        "$pkg/usr/share/doc/rma-agent" "$pkg/usr/share/lintian/overrides" "$pkg/usr/share/man/man1"
    cp -a "$vdir/tree" "$pkg/opt/rma-agent"
    # Normalise modes: a tree extracted by pip may carry odd bits; root owns all (--root-owner-group).
    find "$pkg/opt/rma-agent" -type d -exec chmod 0755 {} +
    find "$pkg/opt/rma-agent" -type f -exec chmod u+rw,go+r,go-w {} +
    ln -s /opt/rma-agent/bin/rma-agent "$pkg/usr/bin/rma-agent"
    # Units stay in /lib/systemd/system on both releases: on trixie (merged /usr) that is the
    # same directory as /usr/lib/systemd/system, and moving a file between the two aliases
    # in an upgrade (bookworm build -> trixie build) is what loses files under dpkg (DEP17).
    install -m 0644 "$src/systemd/rma-agent.service" "$src/systemd/rma-tunnel.service" "$pkg/lib/systemd/system/"
    install -m 0755 "$src/systemd/rma-tunnel" "$pkg/usr/lib/rma-agent/rma-tunnel"
    install -m 0644 "$src/config/agent.toml" "$pkg/etc/rma-agent/agent.toml"
    install -m 0644 "$here/debian/default" "$pkg/etc/default/rma-agent"
    install -m 0644 "$here/debian/copyright" "$pkg/usr/share/doc/rma-agent/copyright"
    install -m 0644 "$here/debian/README.Debian" "$pkg/usr/share/doc/rma-agent/README.Debian"
    # The top changelog entry is the version built: the same text for both releases, with
    # the release's version and distribution (as Debian's own stable updates do).
    { sed -e "1s/^rma-agent ([^)]*) [^;]*;/rma-agent ($version) $rel;/" -e "2a\\
  * Built for $codename_long, Python $(cat "$vdir/python3-minor")." "$here/debian/changelog"; } \
        | gzip -9n > "$pkg/usr/share/doc/rma-agent/changelog.Debian.gz"
    install -m 0644 "$vdir/bundled" "$pkg/usr/share/doc/rma-agent/bundled-python-packages.txt"
    gzip -9n < "$here/debian/rma-agent.1" > "$pkg/usr/share/man/man1/rma-agent.1.gz"
    chmod 0644 "$pkg/usr/share/man/man1/rma-agent.1.gz"
    install -m 0644 "$here/debian/lintian-overrides" "$pkg/usr/share/lintian/overrides/rma-agent"
    local s
    for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$pkg/DEBIAN/$s"; done
    install -m 0644 "$here/debian/conffiles" "$pkg/DEBIAN/conffiles"

    # Depends: the interpreter the venv links to (this release's python3 minor exactly), what
    # the maintainer scripts and units use, and the system libraries the compiled modules
    # link against.
    local glibc libdeps="" p pyminor pynext
    glibc=$(cat "$vdir/glibc-version")
    pyminor=$(cat "$vdir/python3-minor")
    pynext="${pyminor%.*}.$((${pyminor#*.} + 1))"
    while read -r p; do
        case "$p" in
            libc6) ;;                                  # versioned below
            libpython3*|python3*) ;;                   # covered by python3 (= X.Y)
            unknown*) echo "build-deb.sh: unresolved library: $p" >&2; rm -rf "$work"; return 1 ;;
            *) libdeps="$libdeps, $p" ;;
        esac
    done < "$vdir/needed-packages"
    # procps: /bin/kill for ExecReload= (not in a minimal install).
    local depends="python3 (>= $pyminor), python3 (<< $pynext), libc6 (>= ${glibc:-2.36})${libdeps}, adduser, procps, systemd, init-system-helpers (>= 1.54~)"
    local installed_size
    installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
    sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" \
        -e "s/@INSTALLED_SIZE@/$installed_size/" "$here/debian/control.in" > "$pkg/DEBIAN/control"
    (cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
    chmod 0644 "$pkg/DEBIAN/md5sums"

    rm -f "$deb" "$stampfile"
    dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
    rm -rf "$work"
    echo "build-deb.sh: built $deb ($(du -h "$deb" | cut -f1), $(($(date +%s) - t0)) s)"
    echo "build-deb.sh: Depends: $depends"

    local lintian_out="$out/.rma-agent_${version}_${arch}.lintian"
    rm -f "$lintian_out"
    if [ "$run_lintian" = 1 ]; then
        if command -v lintian >/dev/null; then
            # --fail-on error: warnings are reported but only errors fail the build. What
            # lintian said is kept next to the package (the tests require it to be empty).
            # (Tags are on stdout; stderr only has lintian's notes, e.g. about running as root.)
            lintian --fail-on error "$deb" > "$lintian_out.tmp" 2> >(grep -v 'running with root privileges' >&2) || {
                cat "$lintian_out.tmp" >&2
                echo "build-deb.sh: lintian reported errors in $deb" >&2; return 1; }
            mv "$lintian_out.tmp" "$lintian_out"
            cat "$lintian_out"
            echo "build-deb.sh: lintian: no errors ($rel, $(wc -l < "$lintian_out") lines of warnings/info)"
        else
            echo "build-deb.sh: lintian not installed; skipped (packaging/deps.sh)" >&2
        fi
    fi
    printf '%s' "$inputs_hash" > "$stampfile"
    exec 8>&-
}

# Debootstrap the later releases' build root filesystems (cold cache) while the first one
# builds; rootfs.sh locks, so build_venv simply waits for them when it gets there.
first=1
for rel in $releases; do
    [ "$first" = 1 ] && { first=0; continue; }
    bash "$here/rootfs.sh" build "$rel" >/dev/null 2>&1 &
done
for rel in $releases; do
    build_one "$rel"
done
wait
