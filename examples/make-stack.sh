#!/usr/bin/env bash
# Build a mountable copy of the example layer stack in DEST (default examples/.run).
#
#   DEST/base DEST/app DEST/config   copies of examples/layers/*, with the markers listed in
#                                    examples/layers/kernel-markers.txt made real (char 0/0
#                                    whiteouts, trusted.overlay.opaque=y), which git cannot
#                                    store; the OCI-format markers (.wh.NAME, .wh..wh..opq)
#                                    are kept as they are, so the stack has both formats
#   DEST/upper DEST/work DEST/mnt    empty upper layer, work dir and mount point
#
# Needs root (mknod of a 0/0 device, trusted.* xattrs). Refuses to touch DEST while
# something is mounted below it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/.run}"
layers="$here/layers"
manifest="$layers/kernel-markers.txt"

if [ "$(id -u)" != 0 ]; then
    echo "make-stack.sh: needs root (mknod c 0 0 and trusted.overlay.* xattrs)" >&2
    exit 1
fi

mkdir -p "$dest"
dest="$(cd "$dest" && pwd -P)"
if grep -qs " $dest[/ ]" /proc/mounts; then
    echo "make-stack.sh: something is mounted under $dest; unmount it first" >&2
    exit 1
fi

for d in base app config upper work mnt; do
    rm -rf -- "${dest:?}/$d"
done
for layer in base app config; do
    cp -a -- "$layers/$layer" "$dest/$layer"
done
mkdir -p "$dest/upper" "$dest/work" "$dest/mnt"

lineno=0
while read -r layer kind path rest; do
    lineno=$((lineno + 1))
    case "$layer" in ''|'#'*) continue ;; esac
    target="$dest/$layer/$path"
    case "$kind" in
        whiteout)
            rm -rf -- "$target"
            mknod -m 000 "$target" c 0 0
            ;;
        opaque)
            if [ ! -d "$target" ]; then
                echo "make-stack.sh: $manifest:$lineno: $layer/$path is not a directory" >&2
                exit 1
            fi
            setfattr -n trusted.overlay.opaque -v y "$target"
            ;;
        *)
            echo "make-stack.sh: $manifest:$lineno: unknown kind '$kind'" >&2
            exit 1
            ;;
    esac
done < "$manifest"

echo "example stack ready in $dest (lowerdir=config:app:base, upperdir=upper, workdir=work)"
