#!/bin/sh
# First run of the "changes" container: every kind of change a container makes to the
# image's (lower) files. Runs inside a container whose rootfs is served by the mount
# program under test. Prints "MUTATE_OK" at the end; any failing step stops it (set -e).
set -eu

rm /etc/issue                                   # delete a lower file -> whiteout
echo hello > /root/new.txt                      # new file in a lower directory
echo extra >> /etc/motd                         # data copy-up (append)
sed -i 's/^/# /' /etc/issue.net                 # rewrite via temp file + rename over lower
chmod 600 /etc/shells                           # metadata-only copy-up
chown 1000:1000 /etc/profile
touch -d '2001-02-03 04:05:06' /etc/debian_version
mv /usr/share/doc/dpkg /opt/dpkg-doc            # rename a lower dir (EXDEV -> copy+delete)
rm -rf /usr/share/doc/tzdata                    # delete a lower dir, recreate it: opaque
mkdir /usr/share/doc/tzdata
echo fresh > /usr/share/doc/tzdata/only
ln /etc/host.conf /root/hostconf-link           # hard link to a lower file
ln -s /etc/os-release /root/osr-sym
mkfifo /root/fifo
mkdir -p /srv/a/b/c && echo deep > /srv/a/b/c/file && rm -r /srv/a/b   # upper-only churn
dpkg -r e2fsprogs > /root/dpkg-r.log 2>&1       # offline package removal (dpkg db rewrite)
test ! -e /usr/sbin/e2fsck
test "$(dpkg-query -W -f='${db:Status-Abbrev}' e2fsprogs)" = "rc "
echo MUTATE_OK
