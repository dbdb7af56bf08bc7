#!/usr/bin/env bash
# Mount the example layer stack with overlayfs-py and use it with ordinary programs.
#
#   bash examples/demo.sh            (or: make demo)
#
# OVL_DEMO_PROG overrides the program (default .venv/bin/overlayfs-py), e.g.
# OVL_DEMO_PROG=fuse-overlayfs to compare. The mount is always removed on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
top="$(pwd -P)"
run_dir="$top/examples/.run"
mnt="$run_dir/mnt"
prog="${OVL_DEMO_PROG:-$top/.venv/bin/overlayfs-py}"

unmount() {
    if grep -qs " $mnt " /proc/mounts; then
        fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt"
    fi
}
trap unmount EXIT
trap 'exit 130' INT TERM

# List a layer: one path a line, markers explained.
show_tree() {
    (cd "$1" && find . -mindepth 1 | sort | while IFS= read -r p; do
        if [ -c "$p" ]; then
            printf '  %s  (char device %s: kernel whiteout)\n' "$p" "$(stat -c '%t/%T' "$p")"
        elif [ "${p##*/}" = ".wh..wh..opq" ]; then
            printf '  %s  (OCI opaque marker)\n' "$p"
        elif [ "${p##*/.wh.}" != "$p" ]; then
            printf '  %s  (OCI whiteout)\n' "$p"
        elif [ -L "$p" ]; then
            printf '  %s -> %s\n' "$p" "$(readlink "$p")"
        else
            printf '  %s\n' "$p"
        fi
    done)
}
if [ -t 1 ]; then
    say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    say() { printf '\n== %s\n' "$*"; }
fi
# Show a command, then run it inside the mount point (in a subshell, so that the demo
# shell itself never holds the mount busy).
in_mnt() { printf '$ %s\n' "$*"; (cd "$mnt" && sh -c "$*"); }

unmount                                   # a leftover from an interrupted run
bash examples/make-stack.sh "$run_dir" >/dev/null

say "The layers (top first): config, app, base; plus an empty upper"
for layer in config app base; do
    echo "-- $layer"
    show_tree "$run_dir/$layer"
done
echo "-- xattrs marking opaque dirs (kernel format):"
(cd "$run_dir" && getfattr -R -h -m trusted.overlay. -d app 2>/dev/null | sed -n 's/^# file: /  /p')

say "Mount"
opts="lowerdir=$run_dir/config:$run_dir/app:$run_dir/base,upperdir=$run_dir/upper,workdir=$run_dir/work"
printf '$ %s -o %s %s\n' "$(basename "$prog")" "$opts" "$mnt"
# shellcheck disable=SC2086
$prog -o "$opts" "$mnt"
grep " $mnt " /proc/mounts

say "Reading the merged view"
in_mnt "ls -la"
in_mnt "cat etc/os-release etc/motd etc/hostname"
in_mnt "ls -la etc usr/share usr/share/doc var/cache srv/www"
in_mnt "find . | sort"
in_mnt "grep -rn greeting etc"
in_mnt "readlink bin/hi etc/localtime"
in_mnt "./bin/hello && ./bin/hi"
in_mnt "./opt/app/bin/app"
in_mnt "stat -c '%n: %F, inode %i, mode %A' etc/motd bin/hello usr/share/doc"
in_mnt "test ! -e etc/legacy.conf && test ! -e usr/share/man && test ! -e var/cache/apt && echo 'deleted entries stay deleted'"

say "Writing through the mount (changes go to the upper layer only)"
in_mnt "echo 'motd edited through the overlay' > etc/motd && cat etc/motd"
in_mnt "mkdir -p home/demo && echo 'a new file' > home/demo/notes.txt"
in_mnt "rm var/log/base-install.log && ls -la var/log"
in_mnt "sh -c 'echo run by sh inside the mount: \$(wc -l < etc/passwd) users'"

say "The upper layer afterwards"
show_tree "$run_dir/upper"
echo "-- the lower layers are untouched:"
printf '  base/etc/motd: %s\n' "$(cat "$run_dir/base/etc/motd")"
printf '  base/var/log/base-install.log: %s\n' "$(cat "$run_dir/base/var/log/base-install.log")"

say "Unmount"
echo "\$ fusermount3 -u $mnt"
fusermount3 -u "$mnt"
for _ in $(seq 50); do grep -qs " $mnt " /proc/mounts || break; sleep 0.1; done
grep -qs " $mnt " /proc/mounts && { echo "still mounted!" >&2; exit 1; }
echo "unmounted; the stack stays in $run_dir for a look"
