"""Rootless podman: podman run by a normal user, with our program as its mount program.

Used by tests/test_podman_rootless.py, with tests/nonroot.py's throwaway user
(``nonroot.nonroot_user()``: subordinate uid and gid ranges, /dev/fuse open to it; the
user, its ranges and the device's mode are undone afterwards). ``UserPodman`` sets that
user up the way the README's "Without root" section tells a user to
(``~/.config/containers/storage.conf`` with ``mount_program``,
``~/.config/containers/containers.conf``; nothing else, no extra mount options), runs
``podman`` as that user (``runuser``; podman then maps the user's subordinate id ranges
with newuidmap/newgidmap and runs the mount program as uid 0 of that user namespace), and
on ``cleanup()`` removes every container and image, stops what is left of the user's
podman (its pause process, conmon, our daemons) by pid, and deletes the store (its files
belong to subordinate ids: removed as root).

The store is podman's default for the user (``~/.local/share/containers/storage``), so no
``--root`` is passed: with ``--root``, podman 4.3 drops storage.conf's driver options
(``--storage-opt overlay.mount_program=...`` would be needed then).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import podkit
import nonroot  # noqa: E402  (tests/, on the path podkit sets)


def storage_conf(mount_program: str, mountopt: str = "") -> str:
    opt = f'mountopt = "{mountopt}"\n' if mountopt else ""
    return f"""\
[storage]
driver = "overlay"

[storage.options.overlay]
mount_program = "{mount_program}"
{opt}"""


class UserPodman:
    """podman as ``user`` (tests/nonroot.py's throwaway user: it has subordinate uid and
    gid ranges, and /dev/fuse is open to it)."""

    def __init__(self, user: nonroot.NonRootUser, mount_program: str, runtime_dir: Path):
        self.user = user
        self.who = f" (as {user.name})"     # in messages
        self.uid, self.gid, self.home = user.uid, user.gid, user.home
        self.prog = mount_program
        self.runtime_dir = runtime_dir
        self.store = self.home / ".local" / "share" / "containers"
        conf = self.home / ".config" / "containers"
        for d in (runtime_dir, conf, self.store):
            self.mkdir(d)
        self.runtime_dir.chmod(0o700)
        self.write(conf / "containers.conf", podkit.containers_conf())
        self.conf = conf
        self.configure()
        self.env = {"XDG_RUNTIME_DIR": str(runtime_dir)}     # beside the user's own

    def configure(self, mountopt: str = "") -> None:
        """(Re)write the user's storage.conf: our mount program, and ``mountopt`` if any
        (extra mount options podman appends to the program's ``-o``)."""
        self.write(self.conf / "storage.conf", storage_conf(self.prog, mountopt))

    # -- files the user owns
    def mkdir(self, path: Path) -> Path:
        """``path`` and its missing parents below the home, owned by the user."""
        path = Path(path)
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            os.chown(d, self.uid, self.gid)
        return path

    def write(self, path: Path, text: str, mode: int = 0o644) -> Path:
        path = Path(path)
        path.write_text(text)
        os.chown(path, self.uid, self.gid)
        path.chmod(mode)
        return path

    # -- running podman
    def __call__(self, *args: str, check: bool = True, timeout: float = 300
                 ) -> subprocess.CompletedProcess:
        return podkit.run_podman(self.user.argv(["podman", *args], env=self.env),
                                 f"podman {shlex.join(args)}{self.who}", check, timeout,
                                 cwd=self.home, stdin=subprocess.DEVNULL)

    def out(self, *args: str, **kw) -> str:
        return self(*args, **kw).stdout

    # -- what the user's podman left running
    def processes(self) -> Dict[int, List[str]]:
        """pid -> argv of every process running as the user or one of its subordinate uids."""
        start = self.user.subid_start("uid")
        ranges = [range(start, start + nonroot.SUBID_COUNT)]
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                if uid != self.uid and not any(uid in r for r in ranges):
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            out[int(entry)] = argv
        return out

    def daemons(self) -> Dict[int, List[str]]:
        return {pid: argv for pid, argv in self.processes().items()
                if any("overlayfs_py" in a or "overlayfs-py" in a for a in argv)}

    def pause_pid(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError):
            return int((self.runtime_dir / "libpod" / "tmp" / "pause.pid").read_text())
        return None

    # -- cleanup
    def cleanup(self) -> List[str]:
        """Remove every container and image, stop the user's podman processes, delete the
        store and the runtime dir; return what had to be forced (leaks) as messages."""
        problems = podkit.remove_all(self, self.who)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.daemons():
            time.sleep(0.2)
        daemons = self.daemons()
        if daemons:
            problems.append("mount program daemons still running after podman rm/rmi: " +
                            "; ".join(f"{p}: {shlex.join(a)[:200]}" for p, a in daemons.items()))
        # The pause process holds the user namespace and the mount namespace where the
        # containers' mounts live; podman leaves it running by design. Then whatever is
        # left of the user's processes (all started by this podman).
        pause = self.pause_pid()
        if pause:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pause, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            procs = self.processes()
            if not procs:
                break
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        left = self.processes()
        if left:
            problems.append("processes of the user left after SIGKILL: " +
                            "; ".join(f"{p}: {shlex.join(a)[:200]}" for p, a in left.items()))
        for d in (self.store, self.runtime_dir):
            subprocess.run(["rm", "-rf", "--one-file-system", str(d)], capture_output=True)
            if d.exists():
                problems.append(f"could not remove {d}")
        return problems


def filter_tar(src: Path, dst: Path, skip_devices: bool = True) -> int:
    """Copy the tar ``src`` to ``dst`` without its device nodes; the number left out."""
    import tarfile
    skipped = 0
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            if skip_devices and (m.ischr() or m.isblk()):
                skipped += 1
                continue
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
    return skipped
