"""Shared fixtures for the mount-level tests.

Fixtures (all factories, all cleaned up on teardown even when the test fails):

``make_layers(*specs, upper=None) -> Stack``
    Build a stack from layer specs given top layer first (see ``layerkit.make_layer``).
    ``upper`` may be None (read-only stack), ``True`` (an empty upper dir) or a spec dict.
    Each call gets its own directory, with ``work`` and a mount point ready.

``mounted(stack, options=(), prog=None) -> layerkit.FuseMount``
    Mount ``stack`` with our filesystem (or ``prog`` / ``$OVL_TEST_PROG``); ``.path`` is the
    mount point. On teardown the daemon is unmounted and must exit 0.

``kernel_mount(stack, convert=True, options=()) -> Path``
    Mount the same stack with the kernel overlay. With ``convert`` the layers are copied
    and their OCI markers rewritten into the kernel format first (the kernel does not read
    ``.wh.*`` files); the upper, if any, is copied too so that the FUSE mount's upper
    stays untouched.

Setting ``OVL_TEST_PROG=kernel`` makes ``mounted`` use the kernel overlay instead (on a
kernel-format copy of the layers, as ``kernel_mount`` does). That run checks that the tests
themselves encode the kernel's behaviour; tests that need a daemon call ``fuse_only()``.

Tests that use ``mounted`` are skipped (not failed) without root or /dev/fuse; tests that
use ``kernel_mount`` are skipped without the kernel overlay driver. Both get the ``mount``
/ ``kernel`` markers automatically. At the end of the session, any mount left under the
pytest temporary directory is reported (and the run fails), then lazily unmounted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import layerkit  # noqa: E402

_BASETEMP: List[Path] = []


@dataclasses.dataclass
class Stack:
    root: Path                 # directory holding everything of this stack
    lowers: List[Path]         # top layer first
    upper: Optional[Path]
    work: Optional[Path]
    mnt: Path                  # an empty directory to mount on

    @property
    def layers(self) -> List[Path]:
        """All layers, top first (the upper, if any, then the lowers)."""
        return ([self.upper] if self.upper is not None else []) + list(self.lowers)


DEFAULT_TIMEOUT = 300.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "timeout(seconds): watchdog limit for one test (default $OVL_TEST_TIMEOUT "
                   f"or {DEFAULT_TIMEOUT:.0f} s); on expiry the test's FUSE daemons are killed "
                   "and its FUSE connections aborted, so a hung filesystem fails the test "
                   "instead of hanging the run")


class WatchdogTimeout(BaseException):
    """Raised in the test's main thread when the watchdog fires (a BaseException, so that a
    test's own ``except Exception`` cannot swallow it)."""


@pytest.fixture(autouse=True)
def _hang_watchdog(request, tmp_path_factory):
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker else float(os.environ.get("OVL_TEST_TIMEOUT",
                                                                       DEFAULT_TIMEOUT))
    base = tmp_path_factory.getbasetemp()
    fired: List[str] = []
    done = threading.Event()
    main = threading.main_thread().ident
    use_signal = threading.current_thread() is threading.main_thread()

    def on_alarm(signum, frame):
        if fired and not done.is_set():
            raise WatchdogTimeout(f"watchdog: the test ran longer than {limit:.0f} s")

    def watch():
        if done.wait(limit):
            return
        # Until the test ends: kill the daemons it started (that aborts their FUSE
        # connections), abort its FUSE mounts, and interrupt whatever the main thread is
        # blocked in (a FIFO open, a wait...) with SIGALRM, which raises WatchdogTimeout.
        while not done.is_set():
            killed = layerkit.kill_descendants(os.getpid())
            aborted = layerkit.abort_fuse_mounts_under(base)
            if not fired:
                fired.append(f"killed pids {killed}, aborted FUSE mounts {aborted}")
            if use_signal:
                signal.pthread_kill(main, signal.SIGALRM)
            done.wait(5)

    old_handler = signal.signal(signal.SIGALRM, on_alarm) if use_signal else None
    thread = threading.Thread(target=watch, name="ovl-test-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if use_signal:
            signal.signal(signal.SIGALRM, old_handler)
    if fired:
        pytest.fail(f"watchdog: the test ran longer than {limit:.0f} s ({fired[0]})",
                    pytrace=False)


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "mounted" in names:
            item.add_marker(pytest.mark.mount)
        if "kernel_mount" in names:
            item.add_marker(pytest.mark.kernel)


_MOUNTS_AT_START: List[str] = []


def _overlayish_mounts() -> List[str]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "overlay" or fields[2].startswith("fuse"):
                out.append(layerkit._unescape_mount_path(fields[1]))
    return out


def pytest_sessionstart(session):
    _MOUNTS_AT_START[:] = _overlayish_mounts()


@pytest.fixture(scope="session", autouse=True)
def _record_basetemp(tmp_path_factory):
    _BASETEMP.append(tmp_path_factory.getbasetemp())
    yield


def pytest_sessionfinish(session, exitstatus):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    leftovers = []
    for base in _BASETEMP:
        leftovers += layerkit.mounts_under(base)
    # Mounts that appeared during the session elsewhere (tests that mount in their own
    # temporary dirs): reported only, and only under CI=..., since on a shared development
    # machine other sessions mount things too.
    elsewhere = []
    if os.environ.get("CI"):
        elsewhere = [m for m in _overlayish_mounts()
                     if m not in _MOUNTS_AT_START and m not in leftovers]
    if elsewhere:
        note = ("note: overlay/FUSE mounts created during the session are still mounted "
                "(not under the pytest tmp dir, left alone):\n  " + "\n  ".join(elsewhere))
        if tr is not None:
            tr.write_line(note, yellow=True)
        else:
            print(note, file=sys.stderr)
    if not leftovers:
        return
    for mp in leftovers:
        layerkit.unmount_quietly(mp)
    msg = "mounts left behind by the tests (now lazily unmounted):\n  " + "\n  ".join(leftovers)
    if tr is not None:
        tr.write_line("ERROR: " + msg, red=True)
    else:
        print("ERROR: " + msg, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def kernel_mode() -> bool:
    """True when the FUSE fixtures are redirected to the kernel overlay."""
    return os.environ.get("OVL_TEST_PROG", "").strip() == "kernel"


def fuse_only(why: str = "needs a FUSE daemon") -> None:
    if kernel_mode():
        pytest.skip(f"OVL_TEST_PROG=kernel: {why}")


@dataclasses.dataclass
class KernelMount:
    """What ``mounted`` returns in kernel mode (no daemon: ``pid`` is None)."""
    mountpoint: str
    pid: None = None

    @property
    def path(self) -> Path:
        return Path(self.mountpoint)


def _mount_kernel_copy(exits: contextlib.ExitStack, stack: Stack, kroot: Path,
                       convert: bool = True, options=()) -> Path:
    kroot.mkdir()
    if convert:
        lowers = []
        for i, layer in enumerate(stack.lowers):
            dst = layerkit.copy_tree(layer, kroot / f"lower{i}")
            layerkit.to_kernel_format(dst)
            lowers.append(dst)
        upper = work = None
        if stack.upper is not None:
            upper = layerkit.copy_tree(stack.upper, kroot / "upper")
            layerkit.to_kernel_format(upper)
            work = kroot / "work"
            work.mkdir()
    else:
        lowers, upper, work = stack.lowers, stack.upper, stack.work
    mnt = kroot / "mnt"
    mnt.mkdir()
    exits.enter_context(layerkit.kernel_overlay(lowers, upper, work, mnt=mnt, options=options))
    return mnt


def require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("mount tests need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if not layerkit.fuse_available():
        pytest.skip("fusermount3 not installed")


def require_kernel_overlay() -> None:
    if not layerkit.kernel_overlay_available():
        pytest.skip("kernel overlay not available (needs root and the overlay module)")


@pytest.fixture
def make_layers(tmp_path):
    counter = [0]

    def make(*specs, upper=None) -> Stack:
        counter[0] += 1
        root = tmp_path / f"stack{counter[0]}"
        root.mkdir()
        lowers = [layerkit.make_layer(root / f"lower{i}", spec or {})
                  for i, spec in enumerate(specs)]
        up = work = None
        if upper is not None:
            up = layerkit.make_layer(root / "upper", {} if upper is True else upper)
            work = root / "work"
            work.mkdir()
        mnt = root / "mnt"
        mnt.mkdir()
        return Stack(root, lowers, up, work, mnt)

    return make


@pytest.fixture
def mounted():
    exits = contextlib.ExitStack()
    counter = [0]

    def mount(stack: Stack, options=(), prog=None, mnt=None, **kw) -> layerkit.FuseMount:
        counter[0] += 1
        if prog is None and kernel_mode():
            require_kernel_overlay()
            kopts = [o for o in options if o not in ("allow_other", "ro")]
            return KernelMount(str(_mount_kernel_copy(exits, stack,
                                                      stack.root / f"kmounted{counter[0]}",
                                                      options=kopts)))
        require_fuse()
        if mnt is None:
            mnt = stack.mnt if counter[0] == 1 else stack.root / f"mnt{counter[0]}"
        Path(mnt).mkdir(exist_ok=True)
        return exits.enter_context(layerkit.fuse_mount(
            prog, stack.lowers, stack.upper, stack.work, mnt, options, **kw))

    try:
        yield mount
    finally:
        exits.close()


@pytest.fixture
def kernel_mount():
    exits = contextlib.ExitStack()
    counter = [0]

    def mount(stack: Stack, convert: bool = True, options=()) -> Path:
        require_kernel_overlay()
        counter[0] += 1
        return _mount_kernel_copy(exits, stack, stack.root / f"kernel{counter[0]}",
                                  convert=convert, options=options)

    try:
        yield mount
    finally:
        exits.close()


@pytest.fixture(scope="module")
def nonroot_user():
    """A throwaway non-root user, for one test module (tests/nonroot.py); skipped with the
    reason where the machine cannot make one. Per module, so that the machine-wide lock it
    holds is free again for the next module (a second flock of it in this process would
    wait for ever)."""
    import nonroot
    why = nonroot.unavailable()
    if why:
        pytest.skip(why)
    with nonroot.nonroot_user() as user:
        yield user
