#!/bin/sh
# Real programs doing real work on the container's rootfs. Prints KEY=VALUE lines that the
# test checks; any failing step stops it (set -e).
set -eu

# Every packaged file, read back through the mount, against dpkg's own md5sums.
echo "VERIFY1=$(dpkg --verify 2>&1 | tr '\n' ';')"

# shadow's useradd: lock files made with link(), rewrites passwd/shadow/group by rename.
useradd -m -s /bin/sh bob
echo "BOB=$(id -u bob):$(id -g bob)"
# An unprivileged user on the FUSE mount (allow_other + default_permissions).
echo "BOB_FILE=$(runuser -u bob -- sh -c 'echo hi > ~/f && cat ~/f && stat -c %U ~/f' | tr '\n' ' ')"
if runuser -u bob -- sh -c 'echo x > /etc/bob-was-here' 2>/dev/null; then
    echo "BOB_ETC=written"
else
    echo "BOB_ETC=denied"
fi

# Rebuild an installed package from its files and upgrade to it with dpkg -i: dpkg
# unpacks *.dpkg-new next to the lower files, backs them up with link(), renames over.
mkdir -p /tmp/pkg/DEBIAN
dpkg -L hostname | while read -r f; do [ -d "$f" ] || echo "${f#/}"; done \
    | tar -C / -cf - --no-recursion -T - | tar -C /tmp/pkg -xf -
dpkg -s hostname | grep -E '^(Package|Essential|Priority|Section|Maintainer|Architecture|Version|Description):' \
    | sed 's/^Version: .*/&+ovl1/' > /tmp/pkg/DEBIAN/control
echo " rebuilt by the overlayfs-py podman test" >> /tmp/pkg/DEBIAN/control
dpkg-deb -b /tmp/pkg /tmp/hostname.deb > /dev/null
dpkg -i /tmp/hostname.deb > /tmp/dpkg-i.log 2>&1
echo "HOSTNAME_VERSION=$(dpkg-query -W -f='${Version}' hostname)"
echo "HOSTNAME_RUNS=$(hostname --version 2>&1 | head -1)"

# A conffile edited in place by sed -i.
sed -i 's/^#*\s*DSHELL=.*/DSHELL=\/bin\/sh/' /etc/adduser.conf

# Big file: write, copy, checksum.
dd if=/dev/urandom of=/big bs=1M count=24 status=none
a=$(sha256sum < /big | cut -d' ' -f1)
cp /big /big2
b=$(sha256sum < /big2 | cut -d' ' -f1)
echo "BIG_SAME=$([ "$a" = "$b" ] && echo yes || echo "no $a $b")"
echo "BIG_SIZE=$(stat -c %s /big2)"

# Execute binaries that were copied up (chmod) or copied into the upper layer (mmap/exec).
chmod 0700 /usr/bin/date
echo "DATE_RUNS=$(date -u -d @0 +%Y)"
cp /usr/bin/ls /usr/local/bin/myls
echo "MYLS=$(/usr/local/bin/myls -d /usr/local/bin)"

# Truncate a lower file, rename a lower file over another lower file.
: > /etc/issue
mv /etc/host.conf /etc/motd
echo "MOTD=$(cat /etc/motd)"
echo "ISSUE_SIZE=$(stat -c %s /etc/issue)"

# The whole tree, and dpkg's view after all of it.
echo "FIND_COUNT=$(find / -xdev | wc -l)"
echo "VERIFY2=$(dpkg --verify 2>&1 | tr '\n' ';')"
echo WORKLOAD_OK
