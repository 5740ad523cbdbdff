#!/bin/bash
# Turn the packages in dist/ into a signed apt repository (one suite per Debian release).
#
#   bash packaging/build-repo.sh --key SECRET_KEY_FILE [--passphrase-file F]
#                                [--dist DIR] [--out DIR]
#   bash packaging/build-repo.sh --key-id FINGERPRINT ...   (a key already in $GNUPGHOME)
#
# Result (default --out repo/), ready to be copied to any static HTTP(S) host:
#   pool/<suite>/main/r/rma-agent/rma-agent_<version>_amd64.deb
#   dists/<suite>/main/binary-amd64/Packages{,.gz}
#   dists/<suite>/Release, Release.gpg (detached), InRelease (clear-signed)
#   rma-agent-archive-keyring.asc   the public key volunteers put in Signed-By:
#   rma-agent.sources               deb822 example (the suite line is set per box)
# Suites are the Debian codenames: a package goes to the suite its version says it was
# built for (~deb12uN -> bookworm, ~deb13uN -> trixie; packaging/build-deb.sh). Every .deb
# in --dist is published, so keeping the previous version there keeps downgrades possible.
#
# Why apt-ftparchive (apt-utils): the repository is a pure function of dist/ and the key,
# rebuilt from scratch each time with no database to keep in sync or to lose (reprepro and
# aptly keep one, which is worth it for many packages and uploaders, not for one package
# built by CI); it is maintained with apt itself, and signing is one explicit gpg call
# whose key the caller names. The signatures are checked with gpgv before it finishes.
#
# The key: an OpenPGP secret key file (armored or binary) is imported into a throw-away
# GNUPGHOME, so the operator's keyring is not touched; or --key-id picks a key from the
# caller's GNUPGHOME (e.g. on a smartcard). Needs: apt-utils, gnupg (packaging/deps.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
dist="$src/dist"
out="$src/repo"
keyfile=""
keyid=""
passfile=""
origin="rma-agent"
while [ $# -gt 0 ]; do
    case "$1" in
        --key) keyfile=$2; shift ;;
        --key-id) keyid=$2; shift ;;
        --passphrase-file) passfile=$2; shift ;;
        --dist) dist=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,26p' "$0" | cut -c3-; exit 0 ;;
        *) echo "build-repo.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
die() { echo "build-repo.sh: $*" >&2; exit 1; }
[ -n "$keyfile" ] || [ -n "$keyid" ] || die "a signing key is needed: --key FILE or --key-id ID"
for tool in apt-ftparchive gpg gpgv dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool missing (packaging/deps.sh installs apt-utils, gnupg)"
done

tmp=$(mktemp -d)
trap 'gpgconf --homedir "$tmp/gnupg" --kill all >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
if [ -n "$keyfile" ]; then
    [ -r "$keyfile" ] || die "cannot read key file $keyfile"
    export GNUPGHOME="$tmp/gnupg"
    install -d -m 0700 "$GNUPGHOME"
    gpg --batch --quiet --import "$keyfile" 2>"$tmp/import.log" || { cat "$tmp/import.log" >&2; die "cannot import $keyfile"; }
    keyid=$(gpg --batch --with-colons --list-secret-keys | awk -F: '$1 == "fpr" { print $10; exit }')
    [ -n "$keyid" ] || die "$keyfile holds no secret key"
fi
gpg --batch --list-secret-keys "$keyid" >/dev/null 2>&1 || die "no secret key $keyid in ${GNUPGHOME:-~/.gnupg}"
sign=(gpg --batch --yes --quiet --local-user "$keyid" --digest-algo SHA512)
[ -n "$passfile" ] && sign+=(--pinentry-mode loopback --passphrase-file "$passfile")

# Sort the packages into suites by the release their version names.
shopt -s nullglob
debs=("$dist"/rma-agent_*_amd64.deb)
[ ${#debs[@]} -gt 0 ] || die "no rma-agent_*_amd64.deb in $dist (packaging/build-deb.sh)"
new="$tmp/repo"
mkdir -p "$new"
suites=""
for deb in "${debs[@]}"; do
    version=$(dpkg-deb -f "$deb" Version)
    case "$version" in
        *~deb12u*) suite=bookworm ;;
        *~deb13u*) suite=trixie ;;
        *) die "$deb: version $version names no Debian release (~deb12uN / ~deb13uN)" ;;
    esac
    [ "$(basename "$deb")" = "rma-agent_${version}_amd64.deb" ] || die "$deb: file name does not match its version $version"
    pool="pool/$suite/main/r/rma-agent"
    mkdir -p "$new/$pool"
    cp "$deb" "$new/$pool/"
    case " $suites " in *" $suite "*) ;; *) suites="$suites $suite" ;; esac
done

for suite in $suites; do
    case "$suite" in bookworm) nn=12 ;; trixie) nn=13 ;; esac
    bin="dists/$suite/main/binary-amd64"
    mkdir -p "$new/$bin"
    (cd "$new" && apt-ftparchive -o APT::FTPArchive::MD5=false -o APT::FTPArchive::SHA1=false packages "pool/$suite" > "$bin/Packages")
    gzip -9nk "$new/$bin/Packages"
    # Release of the suite. No Valid-Until: boxes must keep working when the operator does
    # not re-publish for a while (replay of an old-but-signed Release can only hold back an
    # update, which Valid-Until would turn into an outage of every box's apt update).
    (cd "$new/dists/$suite" && apt-ftparchive -o APT::FTPArchive::MD5=false -o APT::FTPArchive::SHA1=false \
        -o APT::FTPArchive::Release::Origin="$origin" \
        -o APT::FTPArchive::Release::Label="$origin" \
        -o APT::FTPArchive::Release::Suite="$suite" \
        -o APT::FTPArchive::Release::Codename="$suite" \
        -o APT::FTPArchive::Release::Architectures=amd64 \
        -o APT::FTPArchive::Release::Components=main \
        -o APT::FTPArchive::Release::Description="rma-agent for Debian $nn ($suite)" \
        release . > "$tmp/Release")
    mv "$tmp/Release" "$new/dists/$suite/Release"
    "${sign[@]}" --clearsign -o "$new/dists/$suite/InRelease" "$new/dists/$suite/Release"
    "${sign[@]}" --armor --detach-sign -o "$new/dists/$suite/Release.gpg" "$new/dists/$suite/Release"
done

gpg --batch --armor --export "$keyid" > "$new/rma-agent-archive-keyring.asc"
cat > "$new/rma-agent.sources" <<'EOF'
# /etc/apt/sources.list.d/rma-agent.sources (replace the URL and the suite: bookworm or trixie)
Types: deb
URIs: https://apt.example.org/rma-agent
Suites: bookworm
Components: main
Signed-By: /etc/apt/keyrings/rma-agent.asc
EOF

# Check what we publish the way apt will: each InRelease and Release.gpg verifies against
# the exported public key alone.
gpg --batch --dearmor < "$new/rma-agent-archive-keyring.asc" > "$tmp/pub.gpg"
for suite in $suites; do
    gpgv --quiet --keyring "$tmp/pub.gpg" "$new/dists/$suite/InRelease" 2>/dev/null \
        || die "InRelease of $suite does not verify"
    gpgv --quiet --keyring "$tmp/pub.gpg" "$new/dists/$suite/Release.gpg" "$new/dists/$suite/Release" 2>/dev/null \
        || die "Release.gpg of $suite does not verify"
done

# Swap the finished tree in (the old one is kept until then).
mkdir -p "$(dirname "$out")"
rm -rf "$out.old"
[ -e "$out" ] && mv "$out" "$out.old"
mv "$new" "$out"
rm -rf "$out.old"
for suite in $suites; do
    echo "build-repo.sh: $suite: $(grep -c '^Package:' "$out/dists/$suite/main/binary-amd64/Packages") package(s): $(sed -n 's/^Version: //p' "$out/dists/$suite/main/binary-amd64/Packages" | tr '\n' ' ')"
done
echo "build-repo.sh: signed with $keyid -> $out"
