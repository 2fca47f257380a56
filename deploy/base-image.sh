#!/usr/bin/env bash
# Build a Debian 12 base image without a registry: debootstrap a minimal bookworm and import it.
#
#   deploy/base-image.sh [IMAGE]        (default pathways-lite-base:bookworm; root, dockerd up)
#
# An image of that name already in the engine is kept (delete it to rebuild). The machine's
# extra CA certificates (/usr/local/share/ca-certificates) go into the image's trust store, and
# PIP_CERT points pip at that store: on machines whose HTTPS goes through an inspecting proxy,
# pip inside `docker build` needs them, and the image is never pushed anywhere.
set -euo pipefail

IMAGE="${1:-pathways-lite-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base-image: $IMAGE exists, kept"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is not installed" >&2; exit 1; }

root="$(mktemp -d /tmp/pl-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm into $root"
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" \
    >"$root.log" 2>&1 || { tail -40 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
# Smaller image: no package lists, no apt cache (the Dockerfile runs apt-get update itself).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    - "$IMAGE" >/dev/null
echo "base-image: imported $IMAGE"
