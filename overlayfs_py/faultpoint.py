"""Test-only kill points: stop the daemon dead (SIGKILL) at a named step of an operation.

``OVERLAYFS_PY_KILL_AT=STEP`` (or ``STEP@N``: at the N-th time the step is reached) in the
daemon's environment makes ``hit(STEP)`` kill the process with SIGKILL, so crash tests can
stop the daemon between two named syscalls of a multi-step operation instead of guessing
with timers. Unset (always, outside tests), ``hit`` is a function that does nothing.

Steps (where they are called):
- ``copyup.staged``: a copy-up is complete in the workdir, not yet renamed into place;
- ``whiteout.staged``: a whiteout is linked in the workdir, not yet moved over a name;
- ``whiteout.exchanged``: an upper directory was swapped with a whiteout (rmdir of a merged
  directory) and waits in the workdir to be deleted;
- ``rename.before`` / ``rename.after``: around the renameat2 that moves a name and leaves a
  whiteout (or swaps with one) in one step;
- ``mkdir.staged``: a directory made over a whiteout is built in the workdir, without its
  opaque marker; ``mkdir.opaque``: marked opaque, not yet exchanged with the whiteout;
  ``mkdir.exchanged``: exchanged, the old whiteout not yet removed from the workdir;
- ``metacopy.filled``: a metadata-only copy has its data, the metacopy xattr is still set;
  ``metacopy.done``: the xattr is gone.
"""
from __future__ import annotations

import os
import signal

ENV = "OVERLAYFS_PY_KILL_AT"


def _noop(step: str) -> None:
    pass


def _make_killer(spec: str):
    step, _, count = spec.partition("@")
    left = [int(count) if count else 1]

    def hit(name: str) -> None:
        if name != step:
            return
        left[0] -= 1
        if left[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return hit


_spec = os.environ.get(ENV, "").strip()
hit = _make_killer(_spec) if _spec else _noop
