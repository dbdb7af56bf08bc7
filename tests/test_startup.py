"""The start-up path: trio is imported only once the mount is live (overlayfs_py.lazyimport),
and the command's entry point exits at once without losing output.

No timings here (speed targets live in `make bench`): these check the structure that makes
the start fast, so that a module-level use of trio, or an import that loads it, is caught.
Each check runs in a fresh interpreter, since the test process has trio loaded already.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


def _python(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONWARNINGS", None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_daemon_modules_import_without_loading_trio():
    # what the daemon's child imports before it mounts (cli._load_run)
    r = _python("""
        import sys
        from overlayfs_py import cli
        run, MountError = cli._load_run()
        import overlayfs_py.ops, overlayfs_py.copyup, overlayfs_py.overlay, pyfuse3
        loaded = sorted(m for m in sys.modules if m == "trio" or m.startswith("trio."))
        print(type(sys.modules["trio"]).__name__, loaded)
    """)
    assert r.stdout.strip() == "_Deferred ['trio']", r.stdout


def test_deferred_trio_loads_on_first_use_and_becomes_the_module():
    r = _python("""
        import sys
        from overlayfs_py import lazyimport
        stand_in = lazyimport.defer("trio")
        import trio                                    # binds the stand-in, loads nothing
        assert trio is stand_in and "trio._core" not in sys.modules
        import pyfuse3                                 # pyfuse3 binds it too
        assert pyfuse3.trio is stand_in
        run = trio.run                                 # first use: the real import
        real = sys.modules["trio"]
        assert real is not stand_in and type(stand_in).__name__ == "module"
        assert run is real.run and trio.lowlevel is real.lowlevel
        assert pyfuse3.trio.Lock is real.Lock
        async def main():
            await trio.sleep(0)
            return trio.lowlevel.current_task().name
        print(trio.run(main))
        try:
            trio.no_such_name
        except AttributeError:
            print("AttributeError")
        assert lazyimport.load("trio") is real and lazyimport.defer("trio") is real
    """)
    assert r.stdout.split() == ["__main__.main", "AttributeError"], r.stdout


def test_defer_of_a_missing_module_fails_at_once():
    r = _python("""
        from overlayfs_py import lazyimport
        try:
            lazyimport.defer("no_such_module_anywhere")
        except ImportError as e:
            print("ImportError", e.name)
    """)
    assert r.stdout.strip() == "ImportError no_such_module_anywhere"


def test_introspection_of_the_stand_in_loads_nothing():
    r = _python("""
        import sys
        from overlayfs_py import lazyimport
        t = lazyimport.defer("trio")
        assert not hasattr(t, "__wrapped__") and t.__name__ == "trio"
        print("trio._core" in sys.modules)
    """)
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("entry", [["-m", "overlayfs_py"],
                                   ["-c", "from overlayfs_py.cli import run_main; run_main()"]])
def test_entry_point_exit_keeps_output_and_status(entry, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([sys.executable, *entry, "--version"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("overlayfs-py "), ok
    # stdout a pipe (block-buffered): the text must still arrive before os._exit
    bad = subprocess.run([sys.executable, *entry, "-o", f"lowerdir={tmp_path}/nope",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad
    assert bad.stderr.startswith("overlayfs-py: ") and len(bad.stderr.splitlines()) == 1, bad



def test_serving_loads_trio_but_not_what_trio_imports_for_tls():
    # the daemon's deferred set, then what serving uses of trio: run, a thread, a sleep
    r = _python("""
        import sys
        from overlayfs_py import cli, lazyimport
        cli._load_run()
        import trio
        async def main():
            await trio.to_thread.run_sync(lambda: None)
            await trio.sleep(0)
        trio.run(main)
        print(sorted(m for m in lazyimport.DAEMON_DEFERRED
                     if type(sys.modules[m]).__name__ == "_Deferred"))
    """)
    assert r.stdout.strip() == "['hmac', 'idna', 'ssl']", r.stdout
