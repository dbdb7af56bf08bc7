"""A throwaway non-root user for the tests that run without root (marker ``nonroot``).

``nonroot_user`` (module fixture, registered by conftest) yields a ``NonRootUser``:
created with ``useradd`` (home in a fresh directory under /tmp, a subordinate uid/gid
range of 65536 for rootless podman), with /dev/fuse widened to 0666 if it was narrower.
On teardown, even after failures: the user is removed (``userdel -r``; its /etc/subuid
and /etc/subgid lines must be gone) and /dev/fuse gets its old mode back.

Several test runs may share this machine, and /dev/fuse's mode and /etc/sub[ug]id are
machine-wide: the fixture holds an exclusive flock on ``LOCK`` from before it widens or
creates anything until after it has restored and removed everything.

Run things as the user with ``user.run(argv)`` (runuser, a clean environment), or as uid
0 of a user namespace of the user with ``user.run_userns(argv)`` (``unshare -Urm`` run by
the user: what rootless podman gives its mount program, and where the user may mount the
kernel overlay with ``-o userxattr``, the oracle of the non-root differential tests).
The user cannot enter the root-only pytest tmp dirs: give it directories under
``user.home`` (``user.workdir(name)``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

LOCK = "/run/lock/overlayfs-py-nonroot.lock"
FUSE_DEV = "/dev/fuse"
SUBID_COUNT = 65536
ENV_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class NonRootUser:
    def __init__(self, name: str, home: Path):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, pw.pw_uid, pw.pw_gid, home

    def env(self) -> dict:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": ENV_PATH, "LANG": "C.UTF-8"}

    def argv(self, argv: Sequence[str], userns: bool = False, subids: bool = False,
             env: Optional[dict] = None) -> List[str]:
        """``argv`` as the user (``userns``: as uid 0 of a new user and mount namespace
        of the user; ``subids``: with its subordinate ids as 1..65536 there, as podman
        maps them), in a clean environment (``env``: variables added to it)."""
        inner = (["unshare", "-Urm"] if userns or subids else [])
        if subids:
            inner += [f"--map-users={self.subid_start('uid')},1,{SUBID_COUNT}",
                      f"--map-groups={self.subid_start('gid')},1,{SUBID_COUNT}"]
        inner += list(argv)
        return ["runuser", "-u", self.name, "--", "env", "-i",
                *(f"{k}={v}" for k, v in {**self.env(), **(env or {})}.items()), *inner]

    def subid_start(self, kind: str) -> int:
        for line in Path(f"/etc/sub{kind}").read_text().splitlines():
            f = line.split(":")
            if f[0] == self.name:
                return int(f[1])
        raise LookupError(f"{self.name} has no /etc/sub{kind} range")

    def run(self, argv: Sequence[str], userns: bool = False, check: bool = True,
            timeout: float = 120, subids: bool = False, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.argv(argv, userns, subids), timeout=timeout, cwd=self.home,
                           **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} as {self.name} (userns={userns}) "
                                 f"exited {r.returncode}: {r.stderr or ''}{r.stdout or ''}")
        return r

    def run_userns(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return self.run(argv, userns=True, **kw)

    def workdir(self, name: str) -> Path:
        """A fresh directory of the user's, under its home."""
        d = self.home / name
        if d.exists():
            remove_tree(d)
        d.mkdir(parents=True)
        os.chown(d, self.uid, self.gid)
        return d


def remove_tree(path: Path) -> None:
    """rm -rf as root (a tree may hold files of subordinate ids, or read-only dirs)."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def unavailable() -> Optional[str]:
    """Why this machine cannot run the non-root tests, or None."""
    if os.geteuid() != 0:
        return "the non-root tests create a user: run the suite as root"
    for tool in ("useradd", "userdel", "runuser", "unshare", "fusermount3"):
        if shutil.which(tool) is None:
            return f"no {tool} on this machine"
    if not os.path.exists(FUSE_DEV):
        return "no /dev/fuse"
    with contextlib.suppress(OSError):
        if Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() == "0":
            return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)"
    with contextlib.suppress(OSError):
        if Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
            return "user namespaces are disabled (user.max_user_namespaces=0)"
    return None


def _subid_lines(name: str) -> List[str]:
    out = []
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            out += [f"{path}: {l}" for l in Path(path).read_text().splitlines()
                    if l.split(":")[0] == name]
    return out


def _free_subid_start() -> int:
    """The first start past every range in /etc/subuid and /etc/subgid (>= 100000)."""
    top = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                f = line.split(":")
                if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
                    top = max(top, int(f[1]) + int(f[2]))
    return top


def _kill_user_processes(uid: int) -> None:
    """Leftovers of the user (a daemon of a failed test) would make userdel refuse: kill
    them, by pid (they are the throwaway user's, so they are ours)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if d.stat().st_uid == uid:
                    os.kill(int(d.name), 9)


_held = False      # this process is inside nonroot_user()


@contextlib.contextmanager
def nonroot_user() -> Iterator[NonRootUser]:
    """The fixture's body (see the module docstring); tests/test_podman_rootless.py enters
    it too (its module takes no ``nonroot_user`` fixture). Not nestable: a second flock of
    LOCK on another fd of this process would wait for the first for ever, so a nested call
    raises instead."""
    global _held
    if _held:
        raise RuntimeError("nonroot_user() inside nonroot_user(): one throwaway user at a "
                           f"time per process ({LOCK} is held here already)")
    _held = True
    try:
        with open(LOCK, "a") as lock:
            os.chmod(LOCK, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
            old_mode = stat.S_IMODE(os.stat(FUSE_DEV).st_mode)
            base = Path(tempfile.mkdtemp(prefix="ovl-nonroot-"))
            name = f"ovlnr{os.getpid()}"
            created = False
            try:
                if old_mode & 0o006 != 0o006:
                    os.chmod(FUSE_DEV, old_mode | 0o666)
                base.chmod(0o755)
                start = _free_subid_start()
                subprocess.run(["useradd", "-m", "-d", str(base / "home"), "-s", "/bin/sh",
                                "-K", f"SUB_UID_MIN={start}", "-K", f"SUB_GID_MIN={start}",
                                "-K", f"SUB_UID_COUNT={SUBID_COUNT}",
                                "-K", f"SUB_GID_COUNT={SUBID_COUNT}", name],
                               check=True, capture_output=True, text=True)
                created = True
                if len(_subid_lines(name)) != 2:
                    raise RuntimeError(f"useradd gave {name} no subordinate id ranges")
                yield NonRootUser(name, base / "home")
            finally:
                try:
                    if created:
                        _kill_user_processes(pwd.getpwnam(name).pw_uid)
                        r = subprocess.run(["userdel", "-r", name], capture_output=True,
                                           text=True)
                        left = _subid_lines(name)
                        if r.returncode not in (0, 12) or left:  # 12: home not removed (ours)
                            raise RuntimeError(f"userdel -r {name}: exit {r.returncode} "
                                               f"{r.stderr.strip()}; left: {left}")
                finally:
                    remove_tree(base)
                    os.chmod(FUSE_DEV, old_mode)
    finally:
        _held = False
