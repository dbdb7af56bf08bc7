"""Fault injection for the mount tests: small loop-mounted filesystems, read-only remounts,
and a block device whose reads fail with EIO.

Everything here is a context manager that cleans up in ``finally`` (unmount, detach the
loop device it attached, remove the image) and touches only what it created: loop devices
are the ones ``losetup --find --show`` returned to us, image files and mount points are
named ``ovlpy-*`` below the caller's directory.

This kernel has no device-mapper (no ``error``/``flakey`` targets), no fault injection and
no nbd/ublk, so an I/O error is made one level down: the loop device's backing file lives
on a tiny FUSE filesystem (``faultydisk.py``) that answers EIO for the byte ranges it is
told are bad -- the same as a dm ``error`` target over those sectors.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import layerkit

HERE = Path(__file__).resolve().parent
BLOCK = 4096


def have_loop() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and \
        all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "debugfs"))


def _run(*cmd, check=True) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def mkfs_ext4(image: Path, size_mb: int, inodes: Optional[int] = None,
              populate: Optional[Path] = None) -> None:
    """An ext4 image: 4 KiB blocks, no reserved blocks (root would get them otherwise),
    optionally few inodes, optionally filled from a directory (mke2fs -d, no mount)."""
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    args = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-m", "0", "-E", "nodiscard"]
    if inodes:
        args += ["-N", str(inodes)]
    if populate is not None:
        args += ["-d", str(populate)]
    _run(*args, str(image))


@contextlib.contextmanager
def loop_device(image: Path, read_only: bool = False) -> Iterator[str]:
    dev = _run("losetup", "--find", "--show", *(["--read-only"] if read_only else []),
               str(image)).strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            r = subprocess.run(["losetup", "-d", dev], capture_output=True)
            if r.returncode == 0 or not _loop_backs(dev, image):
                break
            time.sleep(0.1)


def _loop_backs(dev: str, image: Path) -> bool:
    r = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", dev], capture_output=True, text=True)
    return r.returncode == 0 and os.path.realpath(str(image)) in r.stdout


@contextlib.contextmanager
def mounted_dev(dev: str, mnt: Path, options: Sequence[str] = ()) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "ext4", *(["-o", ",".join(options)] if options else []), dev, str(mnt))
    try:
        yield mnt
    finally:
        if layerkit.is_mounted(mnt):
            r = subprocess.run(["umount", str(mnt)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def small_fs(base: Path, name: str, size_mb: int = 16, inodes: Optional[int] = None,
             populate: Optional[Path] = None, options: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh ext4 of ``size_mb`` MiB on a loop device, mounted at ``base/ovlpy-NAME``."""
    image = base / f"ovlpy-{name}.img"
    mkfs_ext4(image, size_mb, inodes, populate)
    try:
        with loop_device(image) as dev:
            with mounted_dev(dev, base / f"ovlpy-{name}", options) as mnt:
                yield mnt
    finally:
        with contextlib.suppress(OSError):
            image.unlink()


def remount(mnt: Path, mode: str) -> None:
    """``mount -o remount,ro|rw`` of a filesystem we mounted."""
    _run("mount", "-o", f"remount,{mode}", str(mnt))


def free_blocks(path) -> int:
    return os.statvfs(path).f_bavail


def free_inodes(path) -> int:
    return os.statvfs(path).f_favail


def file_blocks(image: Path, rel: str) -> List[int]:
    """Block numbers of a file inside an ext4 image (debugfs, image not mounted)."""
    out = _run("debugfs", "-R", f"blocks /{rel}", str(image))
    return [int(x) for x in out.split()]


def _ranges(blocks: Sequence[int]) -> List[Tuple[int, int]]:
    """Byte ranges [start, end) covering the given blocks."""
    out: List[Tuple[int, int]] = []
    for b in sorted(blocks):
        start, end = b * BLOCK, (b + 1) * BLOCK
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class FaultyDisk:
    """A disk image served through ``faultydisk.py``: reads of the bad ranges fail with EIO.
    ``set_bad(ranges)`` changes them while mounted (``[(0, None)]``: the whole device)."""

    def __init__(self, base: Path, name: str):
        self.dir = base / f"ovlpy-{name}-disk"
        self.ctl = base / f"ovlpy-{name}-disk.json"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def path(self) -> Path:
        return self.dir / "disk"

    def set_bad(self, ranges) -> None:
        tmp = self.ctl.with_suffix(".tmp")
        tmp.write_text(json.dumps([[a, b] for a, b in ranges]))
        os.replace(tmp, self.ctl)

    @contextlib.contextmanager
    def serve(self, image: Path) -> Iterator["FaultyDisk"]:
        self.dir.mkdir()
        if not self.ctl.exists():
            self.set_bad([])
        log = open(self.dir.parent / f"{self.dir.name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "faultydisk.py"), str(image),
                                      str(self.ctl), str(self.dir)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        try:
            deadline = time.monotonic() + 20
            while not layerkit.is_mounted(self.dir):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("faulty disk did not mount: "
                                       + (self.dir.parent / f"{self.dir.name}.log").read_text())
                time.sleep(0.02)
            yield self
        finally:
            if layerkit.is_mounted(self.dir):
                r = subprocess.run(["fusermount3", "-u", str(self.dir)], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(self.dir)],
                                   capture_output=True)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def faulty_ext4(base: Path, name: str, populate: Path, bad_files: Sequence[str] = (),
                size_mb: int = 32) -> Iterator[Tuple[Path, FaultyDisk]]:
    """An ext4 filled from ``populate``, mounted read-only from a loop device whose reads
    of the blocks of ``bad_files`` fail with EIO. Yields (mount point, disk)."""
    image = base / f"ovlpy-{name}.img"
    mkfs_ext4(image, size_mb, populate=populate)
    bad = _ranges([b for rel in bad_files for b in file_blocks(image, rel)])
    assert bad or not bad_files, "the bad files have no data blocks"
    disk = FaultyDisk(base, name)
    disk.set_bad(bad)
    try:
        with disk.serve(image):
            with loop_device(disk.path, read_only=True) as dev:
                with mounted_dev(dev, base / f"ovlpy-{name}", ("ro", "noload")) as mnt:
                    yield mnt, disk
    finally:
        with contextlib.suppress(OSError):
            image.unlink()


def loop_devices_of(base: Path) -> List[str]:
    """Loop devices backed by a file below ``base`` (for leak checks)."""
    out = _run("losetup", "-n", "-O", "NAME,BACK-FILE", "-l", check=False)
    base = os.path.realpath(str(base))
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) > 1 and re.sub(r" \(deleted\)$", "", line.split(None, 1)[1])
            .startswith(base)]
