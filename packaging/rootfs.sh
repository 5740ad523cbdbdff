#!/bin/sh
# Make (once) and print the path of a cached Debian 12 "bookworm" root filesystem.
#
#   packaging/rootfs.sh runtime   -> $CACHE/bookworm        what the appliance test boots:
#                                    systemd + the .deb's Depends, nothing else, so a
#                                    missing Depends shows up as a failed install
#   packaging/rootfs.sh build     -> $CACHE/bookworm-build  what build-deb.sh chroots into:
#                                    bookworm's python3.11 + venv + headers + gcc
#
# CACHE defaults to /var/cache/rma-agent-build (RMA_BUILD_CACHE overrides). A root
# filesystem is only used once its ".complete" stamp matches the package list below, so an
# interrupted debootstrap is redone rather than half-used; flock serialises concurrent
# callers (CI jobs, a test fixture and a build at once). Needs root and debootstrap.
set -eu

kind=${1:?usage: rootfs.sh runtime|build}
cache=${RMA_BUILD_CACHE:-/var/cache/rma-agent-build}
suite=bookworm
# The runtime set is what the test container needs to boot (systemd, dbus), what the
# package Depends on (python3, adduser, systemd, procps for ExecReload=/bin/kill) and what the test drives it with (curl).
runtime_pkgs="systemd,systemd-sysv,dbus,python3,adduser,procps,curl,ca-certificates"
case "$kind" in
    runtime) dir="$cache/$suite"; pkgs="$runtime_pkgs" ;;
    build)   dir="$cache/$suite-build"
             pkgs="python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates" ;;
    *) echo "rootfs.sh: unknown kind '$kind' (runtime|build)" >&2; exit 2 ;;
esac

stamp="$dir/.complete"
want="$suite $pkgs"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "$dir"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "rootfs.sh: need root to debootstrap $dir" >&2; exit 1
fi
command -v debootstrap >/dev/null || { echo "rootfs.sh: debootstrap missing (packaging/deps.sh)" >&2; exit 1; }

mkdir -p "$cache"
exec 9>"$cache/.lock-$kind"
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
debootstrap --variant=minbase --include="$pkgs" "$suite" "$dir" "$mirror" >"$cache/debootstrap-$kind.log" 2>&1 || {
    echo "rootfs.sh: debootstrap failed; last lines of $cache/debootstrap-$kind.log:" >&2
    tail -n 20 "$cache/debootstrap-$kind.log" >&2
    exit 1
}
# debootstrap copies the host's hostname; an empty machine-id makes systemd generate one
# at each boot of the (volatile) container instead of sharing one across all of them.
rm -f "$dir/etc/hostname"
: >"$dir/etc/machine-id"
rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*_Packages 2>/dev/null || true
printf '%s' "$want" >"$stamp"
echo "$dir"
