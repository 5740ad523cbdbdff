#!/bin/sh
# Make (once) and print the path of a cached Debian root filesystem, per release.
#
#   packaging/rootfs.sh runtime [SUITE] -> $CACHE/rootfs/SUITE-runtime-<key>
#                                    what the appliance test boots:
#                                    systemd + the .deb's Depends (+ the test's drivers:
#                                    curl, unattended-upgrades), so a missing Depends shows
#                                    up as a failed offline install
#   packaging/rootfs.sh build [SUITE]   -> $CACHE/rootfs/SUITE-build-<key>
#                                    what build-deb.sh chroots into:
#                                    the release's python3 + venv + headers + gcc
#
# SUITE is bookworm (Debian 12, Python 3.11; the default) or trixie (Debian 13, Python 3.13).
# debootstrap checks the suite's Release signature with the host's debian-archive-keyring,
# which must carry the Debian 13 keys for trixie (packaging/deps.sh checks).
#
# CACHE defaults to /var/cache/rma-agent-build (RMA_BUILD_CACHE overrides). A root
# filesystem is only used once its ".complete" stamp matches the package list below, so an
# interrupted debootstrap is redone rather than half-used; flock serialises concurrent
# callers (CI jobs, a test fixture and a build at once). Needs root and debootstrap.
set -eu

kind=${1:?usage: rootfs.sh runtime|build [bookworm|trixie]}
suite=${2:-bookworm}
case "$suite" in
    bookworm|trixie) ;;
    *) echo "rootfs.sh: unsupported suite '$suite' (bookworm|trixie)" >&2; exit 2 ;;
esac
cache=${RMA_BUILD_CACHE:-/var/cache/rma-agent-build}
# The runtime set is what the test container needs to boot (systemd, dbus), what the
# package Depends on (python3, adduser, systemd, procps for ExecReload=/bin/kill) and what the
# tests drive it with (curl; unattended-upgrades for the unattended upgrade from the repo).
runtime_pkgs="systemd,systemd-sysv,dbus,python3,adduser,procps,curl,ca-certificates,unattended-upgrades"
case "$kind" in
    runtime) pkgs="$runtime_pkgs" ;;
    build)   pkgs="python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates" ;;
    *) echo "rootfs.sh: unknown kind '$kind' (runtime|build)" >&2; exit 2 ;;
esac

# Keyed by what it is made of: a change to a package list makes a new directory instead of
# re-doing one another checkout (an older branch, a CI job) may be using right now. Others
# of the same suite and kind unused for PRUNE_DAYS are removed (below).
want="$suite $pkgs"
key=$(printf '%s' "$want" | sha256sum | cut -c1-12)
dir="$cache/rootfs/$suite-$kind-$key"
stamp="$dir/.complete"
PRUNE_DAYS=14
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    touch "$dir/.last-used" 2>/dev/null || true
    echo "$dir"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "rootfs.sh: need root to debootstrap $dir" >&2; exit 1
fi
command -v debootstrap >/dev/null || { echo "rootfs.sh: debootstrap missing (packaging/deps.sh)" >&2; exit 1; }

mkdir -p "$cache/rootfs"
exec 9>"$cache/rootfs/.lock-$suite-$kind-$key"
flock 9
# Another caller may have finished it while we waited for the lock.
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "$dir"
    exit 0
fi

# Use the host's configured Debian mirror (first URIs: line), else deb.debian.org.
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
case "$mirror" in *security*) mirror=http://deb.debian.org/debian ;; esac

# Never rm -rf through a mount (an interrupted debootstrap can leave proc/sys mounted).
if awk -v d="$dir/" 'index($5 "/", d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    echo "rootfs.sh: something is mounted under $dir; unmount it (umount -R) and retry" >&2
    exit 1
fi
rm -rf "$dir"
echo "rootfs.sh: debootstrap $suite ($kind) into $dir from $mirror" >&2
debootstrap --variant=minbase --include="$pkgs" "$suite" "$dir" "$mirror" >"$dir.debootstrap.log" 2>&1 || {
    echo "rootfs.sh: debootstrap failed; last lines of $dir.debootstrap.log:" >&2
    tail -n 20 "$dir.debootstrap.log" >&2
    exit 1
}
# debootstrap copies the host's hostname; an empty machine-id makes systemd generate one
# at each boot of the (volatile) container instead of sharing one across all of them.
rm -f "$dir/etc/hostname"
: >"$dir/etc/machine-id"
rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*_Packages 2>/dev/null || true
printf '%s' "$want" >"$stamp"
touch "$dir/.last-used"
# Prune this suite+kind's other root filesystems nobody used for PRUNE_DAYS (never one with
# something mounted in it).
for old in "$cache/rootfs/$suite-$kind-"*; do
    [ -d "$old" ] && [ "$old" != "$dir" ] || continue
    [ -n "$(find "$old/.last-used" -mtime -"$PRUNE_DAYS" 2>/dev/null)" ] && continue
    awk -v d="$old/" 'index($5 "/", d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo && continue
    rm -rf "$old" "$old.debootstrap.log"
done
echo "$dir"
