#!/bin/sh
# Install the host tools the .deb build and the booted-Debian appliance test need.
#
# Idempotent and cheap when everything is there: apt is only called for packages that are
# missing, so CI can run this on every job without paying for `apt-get update` each time.
#   debootstrap        - the bookworm root filesystem (build chroot and test container)
#   systemd-container  - systemd-nspawn, to boot that root filesystem with systemd as PID 1
#   lintian            - package checks (0 errors is a release gate)
#   dpkg-dev           - dpkg-architecture/dpkg-deb helpers used by build-deb.sh
#   debian-archive-keyring - debootstrap verifies the bookworm and trixie Release files with
#                        it: trixie's is signed by the Debian 13 keys (stable release key
#                        41587F7D...2C39DE4 and the archive keys), which bookworm's package
#                        ships in updated versions (2023.3+deb12u2 on these hosts). Checked
#                        below by the trixie keyring file; if missing, apt upgrades it.
#   apt-utils, gnupg   - packaging/build-repo.sh: apt-ftparchive, signing; the repo tests
#   nftables, iproute2 - the network-namespace tests (NAT router, packet loss)
#   chromium, chromium-driver - the dashboard's real-browser test (selenium drives
#                        /usr/bin/chromedriver; nothing is downloaded at test time)
#   fakeroot is not needed: dpkg-deb --root-owner-group sets ownership itself.
set -eu

want="debootstrap systemd-container lintian dpkg-dev debian-archive-keyring curl nftables iproute2"
# The dashboard's real-browser test (tests/dashboard): headless chromium and its driver.
want="$want chromium chromium-driver"
# The signed apt repository (packaging/build-repo.sh and tests/appliance/test_repo.py).
want="$want apt-utils gnupg"
missing=""
for p in $want; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
# debootstrap of trixie needs the Debian 13 keys in the archive keyring.
if ! [ -f /usr/share/keyrings/debian-archive-trixie-stable.gpg ]; then
    case " $missing " in *" debian-archive-keyring "*) ;; *) missing="$missing debian-archive-keyring" ;; esac
fi
if [ -z "$missing" ]; then
    echo "deps.sh: all present ($want)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "deps.sh: missing:$missing (run as root to install them)" >&2
    exit 1
fi
echo "deps.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
