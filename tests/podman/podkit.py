"""Podman with our filesystem as its overlay ``mount_program``: provisioning and cleanup.

Used by tests/test_podman.py. Everything here is about getting a real container engine to
run on top of overlayfs-py in an isolated, disposable configuration:

* ``ensure_tools()`` installs podman, runc and debootstrap with apt-get when missing.
* ``ensure_rootfs()`` builds a Debian bookworm ``minbase`` root filesystem with debootstrap
  once per machine and caches it as a tar file (``$OVL_PODMAN_CACHE``, default
  /var/cache/overlayfs-py-test), so reruns need neither the network nor debootstrap.
* ``Podman`` writes a private containers.conf / storage.conf / registries.conf /
  policy.json under a temporary directory (graphroot, runroot, tmp_dir, locks and network
  config all live there), runs ``podman`` with them, and on ``cleanup()`` removes every
  container and image, unmounts leftovers, stops only the processes that belong to that
  private storage, and deletes it (and /var/lib/containers, /run/containers, which
  podman 4.3 creates whatever its configuration says, if they did not exist before). It reports (returns) what it had to clean up by force,
  so a test can fail on leaked mounts or daemons.

Environment knobs:
  OVL_TEST_PROG          mount program: unset = <repo>/.venv/bin/overlayfs-py; a command
                         name or path (e.g. fuse-overlayfs) to validate the tests against it;
                         "kernel" = no mount program (podman uses the kernel overlay).
  OVL_PODMAN_CACHE       where the rootfs tar is cached (default /var/cache/overlayfs-py-test)
  OVL_PODMAN_MIRROR      Debian mirror for debootstrap (default: from the apt sources)
  OVL_PODMAN_DAEMON_LOG  1 = run the mount program through a wrapper that keeps it in the
                         foreground (-f) with its stderr in a per-mount log and records its
                         exit status; cleanup() then reports any non-zero exit or any
                         output on stderr (a daemon that logged an error).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

import layerkit  # noqa: E402

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("OVL_PODMAN_CACHE", "/var/cache/overlayfs-py-test"))
ROOTFS_TAR = CACHE / f"rootfs-{SUITE}-minbase.tar"

# command -> Debian package providing it
TOOLS = {"podman": "podman", "runc": "runc", "conmon": "conmon", "debootstrap": "debootstrap",
         "fusermount3": "fuse3"}


class Unavailable(Exception):
    """The environment cannot run this test (the test should skip with this reason)."""


def _run(cmd: Sequence[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------- tools

def _which(cmd: str) -> Optional[str]:
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin:/usr/libexec/podman")


def ensure_tools(tools: Optional[Dict[str, str]] = None) -> None:
    """apt-get install whatever of ``tools`` (command -> package; default TOOLS) is missing;
    raise Unavailable if that fails."""
    tools = TOOLS if tools is None else tools
    if os.geteuid() != 0:
        raise Unavailable("podman test needs root")
    missing = sorted({pkg for cmd, pkg in tools.items() if not _which(cmd)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise Unavailable(f"missing {missing} and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        r = _run(install, 900, env=env)
        if r.returncode != 0:
            u = _run(["apt-get", "update", "-q"], 600, env=env)
            if u.returncode != 0:
                raise Unavailable(f"apt-get update failed: {_tail(u.stdout + u.stderr, 5)}")
            r = _run(install, 900, env=env)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"apt-get install {' '.join(missing)} timed out")
    if r.returncode != 0:
        raise Unavailable(f"apt-get cannot install {' '.join(missing)}: "
                          f"{_tail(r.stdout + r.stderr, 5)}")
    still = sorted(cmd for cmd in tools if not _which(cmd))
    if still:
        raise Unavailable(f"still missing after apt-get install: {still}")


# --------------------------------------------------------------------------- rootfs

def debian_mirror() -> str:
    """The Debian mirror apt uses for SUITE (deb822 .sources or one-line .list files)."""
    env = os.environ.get("OVL_PODMAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        with contextlib.suppress(OSError):
            for block in re.split(r"\n\s*\n", Path(path).read_text()):
                fields: Dict[str, str] = {}
                for line in block.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                if ("deb" in fields.get("types", "").split()
                        and SUITE in fields.get("suites", "").split() and fields.get("uris")):
                    return fields["uris"].split()[0].rstrip("/")
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


def _mirror_reachable(mirror: str) -> Optional[str]:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=20) as resp:
            if resp.status != 200:
                return f"{url}: HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url}: {e}"
    return None


@dataclasses.dataclass
class Rootfs:
    tar: Path
    sha256: str          # digest of the (uncompressed) tar = the layer's diff_id
    built_now: bool      # True if debootstrap ran in this process
    seconds: float       # time spent in ensure_rootfs


def ensure_rootfs() -> Rootfs:
    """The cached debootstrap tar, built first if needed (once per machine, under a lock)."""
    t0 = time.monotonic()
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot create the cache dir {CACHE}: {e}")
    built = False
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta_path = ROOTFS_TAR.with_suffix(".json")
        if not ROOTFS_TAR.exists():
            _build_rootfs()
            built = True
        meta = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_path.read_text())
        st = ROOTFS_TAR.stat()
        if meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns:
            meta.update(size=st.st_size, mtime_ns=st.st_mtime_ns,
                        sha256=layerkit.file_sha256(ROOTFS_TAR))
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return Rootfs(ROOTFS_TAR, meta["sha256"], built, time.monotonic() - t0)


def _build_rootfs() -> None:
    mirror = debian_mirror()
    why = _mirror_reachable(mirror)
    if why:
        raise Unavailable(f"no cached rootfs ({ROOTFS_TAR}) and the Debian mirror is "
                          f"unreachable: {why}")
    build = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
    target = build / "rootfs"
    try:
        r = _run(["debootstrap", "--variant=minbase", SUITE, str(target), mirror], 1800)
        (build / "debootstrap.out").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = (target / "debootstrap" / "debootstrap.log").read_text()
            raise RuntimeError(f"debootstrap failed ({r.returncode}):\n"
                               f"{_tail(r.stdout + r.stderr)}\n--- debootstrap.log:\n"
                               f"{_tail(log)}")
        osr = (target / "etc" / "os-release").read_text()
        if f"VERSION_CODENAME={SUITE}" not in osr:
            raise RuntimeError(f"debootstrap produced an unexpected os-release:\n{osr}")
        tmp = ROOTFS_TAR.with_name(ROOTFS_TAR.name + ".tmp")
        r = _run(["tar", "--numeric-owner", "-C", str(target), "-cf", str(tmp), "."], 900)
        if r.returncode != 0:
            raise RuntimeError(f"tar of the rootfs failed: {r.stderr}")
        os.replace(tmp, ROOTFS_TAR)
    finally:
        # debootstrap mounts proc/sys inside the target; it may leave them on failure.
        for mp in layerkit.mounts_under(build):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        if not layerkit.mounts_under(build):
            subprocess.run(["rm", "-rf", "--one-file-system", str(build)], capture_output=True)
        with contextlib.suppress(OSError):
            ROOTFS_TAR.with_name(ROOTFS_TAR.name + ".tmp").unlink()


# --------------------------------------------------------------------------- configuration

def containers_conf(**engine: str) -> str:
    """The containers.conf every podman of the tests runs with (root podman's private one
    here, the rootless user's in tests/podman/userpod.py): runc, cgroupfs, events in a
    file, open files within the machine's cap; ``engine`` adds ``[engine]`` keys."""
    extra = "".join(f'{k} = "{v}"\n' for k, v in engine.items())
    return f"""\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
{extra}"""


# --------------------------------------------------------------------------- mount program

@dataclasses.dataclass
class MountProgram:
    path: Optional[str]        # what storage.conf names (None: the kernel overlay)
    real: Optional[str]        # the program that serves the mount
    fstype: str                # expected /proc/mounts type of a container's rootfs
    markers: Tuple[str, ...]   # substrings identifying the daemon's command line

    @property
    def is_ours(self) -> bool:
        return self.fstype == "fuse.overlayfs-py"


def mount_program() -> MountProgram:
    prog = os.environ.get("OVL_TEST_PROG", "").strip()
    if prog == "kernel":
        return MountProgram(None, None, "overlay", ())
    if prog:
        words = shlex.split(prog)
        if len(words) != 1:
            raise Unavailable(f"OVL_TEST_PROG={prog!r}: podman needs a single executable")
        path = _which(words[0])
        if not path:
            raise Unavailable(f"OVL_TEST_PROG={prog!r} not found")
        name = os.path.basename(path)
        markers = ("overlayfs_py", "overlayfs-py") if "overlayfs" in name and "py" in name \
            else (name,)
        fstype = "fuse.overlayfs-py" if markers[0] == "overlayfs_py" else f"fuse.{name}"
        return MountProgram(path, path, fstype, markers)
    path = REPO / ".venv" / "bin" / "overlayfs-py"
    if not os.access(path, os.X_OK):
        raise Unavailable(f"{path} not found (run `make setup`)")
    return MountProgram(str(path), str(path), "fuse.overlayfs-py",
                        ("overlayfs_py", "overlayfs-py"))


_WRAPPER = r"""#!/bin/sh
# Keep the mount program in the foreground so its stderr and exit status are recorded.
# Exits 0 once the mount point (the last argument) is mounted, like a daemonizing program.
prog=__PROG__
logdir=__LOGDIR__
for mnt; do :; done
id=$(date +%s%N)-$$
( "$prog" -f "$@" 2>"$logdir/$id.log"; echo "$? $mnt" > "$logdir/$id.exit" ) </dev/null >/dev/null 2>&1 &
i=0
while [ $i -lt 600 ]; do
    if grep -qF " $mnt " /proc/mounts; then exit 0; fi
    [ -e "$logdir/$id.exit" ] && { cat "$logdir/$id.log" >&2; exit 1; }
    sleep 0.05; i=$((i + 1))
done
echo "mount program wrapper: $mnt did not appear in 30 s" >&2
exit 1
"""


# --------------------------------------------------------------------------- podman

SYSTEM_DIRS = ["/var/lib/containers", "/run/containers"]


class PodmanError(AssertionError):
    pass


class Podman:
    """podman with a private configuration and storage under ``root``."""

    def __init__(self, root: Path, prog: MountProgram):
        self.root = Path(os.path.realpath(root))
        self.prog = prog
        self.root.mkdir(parents=True, exist_ok=True)
        self.graph = self.root / "graph"
        self.run_root = self.root / "run"
        self.tmp = self.root / "tmp"
        self.logdir: Optional[Path] = None
        for d in (self.graph, self.run_root, self.tmp, self.root / "libpod-tmp",
                  self.root / "net"):
            d.mkdir(exist_ok=True)
        storage_prog = prog.path
        if prog.path and os.environ.get("OVL_PODMAN_DAEMON_LOG") == "1":
            self.logdir = self.root / "daemon-logs"
            self.logdir.mkdir()
            wrapper = self.root / "mount-program"
            wrapper.write_text(_WRAPPER.replace("__PROG__", shlex.quote(prog.path))
                               .replace("__LOGDIR__", shlex.quote(str(self.logdir))))
            wrapper.chmod(0o755)
            storage_prog = str(wrapper)
        (self.root / "containers.conf").write_text(containers_conf(
            events_logfile_path=f"{self.root}/events.log", tmp_dir=f"{self.root}/libpod-tmp",
            lock_type="file", image_copy_tmp_dir=str(self.tmp)) + f"""
[network]
network_config_dir = "{self.root}/net"
""")
        opts = f'mount_program = "{storage_prog}"\n' if storage_prog else ""
        (self.root / "storage.conf").write_text(f"""\
[storage]
driver = "overlay"
graphroot = "{self.graph}"
runroot = "{self.run_root}"

[storage.options.overlay]
{opts}""")
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.root / "policy.json").write_text(
            '{"default": [{"type": "insecureAcceptAnything"}]}\n')
        self.env = dict(os.environ,
                        CONTAINERS_CONF=str(self.root / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(self.root / "storage.conf"),
                        CONTAINERS_REGISTRIES_CONF=str(self.root / "registries.conf"),
                        TMPDIR=str(self.tmp))
        self.env.pop("CONTAINER_HOST", None)
        self.env.pop("CONTAINER_CONNECTION", None)
        # podman 4.3 has no setting for these two (the blob-info cache of image copies,
        # the network run dir): remove them at cleanup if they did not exist before.
        self.system_dirs = [d for d in SYSTEM_DIRS if not os.path.lexists(d)]

    # -- running podman
    def __call__(self, *args: str, check: bool = True, timeout: float = 300,
                 input: Optional[str] = None, stdin=None) -> subprocess.CompletedProcess:
        cmd = ["podman", *args]
        return run_podman(cmd, shlex.join(cmd), check, timeout, env=self.env, input=input,
                          stdin=stdin if input is None else None)

    def out(self, *args: str, **kw) -> str:
        return self(*args, **kw).stdout

    def sh(self, image: str, script: str, *opts: str, **kw) -> str:
        """``podman run --rm --network none OPTS IMAGE sh -c SCRIPT``; stdout."""
        return self.out("run", "--rm", "--network", "none", *opts, image, "sh", "-c", script,
                        **kw)

    def inspect(self, what: str, fmt: str, kind: str = "container") -> str:
        sub = ["image", "inspect"] if kind == "image" else ["container", "inspect"]
        return self.out(*sub, "--format", fmt, what).strip()

    # -- observing what podman started
    def mounts(self) -> List[Tuple[str, str]]:
        """(mount point, fstype) of every mount under the private storage."""
        found = []
        prefix = str(self.root) + "/"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mp = layerkit._unescape_mount_path(fields[4])
                if mp.startswith(prefix):
                    found.append((mp, fields[sep + 1]))
        return found

    def processes(self) -> Dict[int, List[str]]:
        """pid -> argv of every process whose command line names the private storage."""
        out = {}
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            if any(str(self.root) in a for a in argv):
                out[int(entry)] = argv
        return out

    def daemon_for(self, mountpoint: str) -> Optional[int]:
        """pid of the mount program process serving ``mountpoint``."""
        for pid, argv in self.processes().items():
            if (argv and argv[-1] == mountpoint and "-o" in argv
                    and any(m in " ".join(argv) for m in self.prog.markers)):
                return pid
        return None

    def daemon_reports(self) -> List[str]:
        """With OVL_PODMAN_DAEMON_LOG=1: every daemon that exited non-zero or wrote stderr."""
        if self.logdir is None:
            return []
        bad = []
        for log in sorted(self.logdir.glob("*.log")):
            exit_file = log.with_suffix(".exit")
            text = log.read_text(errors="replace").strip()
            status = exit_file.read_text().strip() if exit_file.exists() else "(still running)"
            if text or not status.startswith("0 "):
                bad.append(f"daemon {log.stem}: exit {status}\n{_tail(text, 30)}")
        return bad

    # -- cleanup
    def cleanup(self) -> List[str]:
        """Remove everything; return what had to be forced (leaks) as messages."""
        problems = remove_all(self)
        # The daemons exit once podman has unmounted; give them a moment.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (self.mounts() or self._daemons()):
            time.sleep(0.2)
        leftover = self.mounts()
        if leftover:
            problems.append("mounts left behind after podman rm/rmi: "
                            + ", ".join(f"{m} ({t})" for m, t in leftover))
        for mp, fstype in sorted(leftover, key=lambda x: -x[0].count("/")):
            cmd = (["fusermount3", "-u", "-z", mp] if fstype.startswith("fuse")
                   else ["umount", "-l", mp])
            subprocess.run(cmd, capture_output=True)
        procs = self.processes()
        if procs:
            problems.append("processes left behind: " + "; ".join(
                f"{pid}: {shlex.join(argv)[:300]}" for pid, argv in procs.items()))
            for pid in procs:            # they belong to this private storage: ours
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        problems += self.daemon_reports()
        for mp, _ in self.mounts():
            subprocess.run(["umount", "-l", mp], capture_output=True)
        if not self.mounts():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)],
                           capture_output=True)
            for d in self.system_dirs:
                shutil.rmtree(d, ignore_errors=True)
        else:
            problems.append(f"could not unmount everything under {self.root}; not deleted")
        return problems

    def _daemons(self) -> List[int]:
        return [pid for pid, argv in self.processes().items()
                if any(m in " ".join(argv) for m in self.prog.markers)]


def run_podman(cmd: Sequence[str], what: str, check: bool = True, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
    """Run the podman command line ``cmd`` (``what`` names it in errors). PodmanError if it
    times out, or (``check``) exits non-zero: with the tails of its output."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise PodmanError(f"{what} timed out after {timeout} s\n"
                          f"stdout: {_tail(_s(e.stdout))}\nstderr: {_tail(_s(e.stderr))}")
    if check and r.returncode != 0:
        raise PodmanError(f"{what} exited {r.returncode}\n--- stdout:\n{_tail(r.stdout, 40)}"
                          f"\n--- stderr:\n{_tail(r.stderr, 40)}")
    return r


def remove_all(pod, who: str = "") -> List[str]:
    """``podman rm -a -f`` and ``podman rmi -a -f`` through ``pod`` (a Podman, or
    userpod.UserPodman: ``who`` names its user); what failed, as messages."""
    problems: List[str] = []
    for args in (("rm", "-a", "-f", "-t", "0"), ("rmi", "-a", "-f")):
        try:
            r = pod(*args, check=False, timeout=180)
            if r.returncode != 0:
                problems.append(f"podman {' '.join(args)}{who} exited "
                                f"{r.returncode}: {_tail(r.stderr, 5)}")
        except PodmanError as e:
            problems.append(str(e))
    return problems


def _s(b) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b
