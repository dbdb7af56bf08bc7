#!/bin/sh
# probe.sh PATH...  -- one line per path, for comparing a container's state across runs:
#   PATH|absent
#   PATH|TYPE|MODE|UID|GID|NLINK|SIZE|MTIME|DETAIL
# DETAIL: sha256 of a regular file, the target of a symlink, the sorted entry names of
# a directory (comma-separated). Directory sizes and mtimes are left out ("-"): they are
# not comparable across a commit.
for p in "$@"; do
    if [ ! -e "$p" ] && [ ! -L "$p" ]; then
        echo "$p|absent"
        continue
    fi
    t=$(stat -c '%F' "$p")
    case "$t" in
        directory)
            meta=$(stat -c '%a|%u|%g|-|-|-' "$p")
            detail=$(ls -A "$p" | LC_ALL=C sort | tr '\n' ',')
            ;;
        "regular file"|"regular empty file")
            meta=$(stat -c '%a|%u|%g|%h|%s|%Y' "$p")
            detail=$(sha256sum < "$p" | cut -d' ' -f1)
            ;;
        "symbolic link")
            meta=$(stat -c '%a|%u|%g|%h|%s|%Y' "$p")
            detail=$(readlink "$p")
            ;;
        *)
            meta=$(stat -c '%a|%u|%g|%h|%s|%Y' "$p")
            detail=-
            ;;
    esac
    echo "$p|$t|$meta|$detail"
done
