#!/usr/bin/env python3
"""Build and install pyfuse3 3.5.0 with the small patch set overlayfs-py needs.

pyfuse3 3.5 hides FUSE features that overlayfs-py needs, and it compiles from source anyway
(there is no binary wheel for libfuse3), so we fetch its pinned sdist from PyPI, apply our
patches to its Cython source, and let pip build it as usual.

The patches are ordinary unified diffs in ``patches/NNNN-name.patch``, applied in order with
``git apply`` (all hunks of a patch or none, no fuzz): each starts with a header that says
what it does and why, so it can be reviewed and offered upstream. A patch that does not
apply stops the build with git's message and the patch's name, instead of building
something half-patched.

Besides the patches, the build stamps the sdist (build metadata, not behaviour):
``pyfuse3.OVERLAYFS_PY_PATCH`` = the number of patches applied (the daemon and the tests
check it to tell our build from a stock pyfuse3), ``pyfuse3.OVERLAYFS_PY_BUILD`` = the
build key below, and the version ``3.5.0+overlayfspyN``.

pyfuse3 is built against a libfuse >= 3.16 (passthrough): the system's when it is recent
enough, else a pinned libfuse linked in statically (``vendor/libfuse/build.py``).

The built wheel is cached per build key (``~/.cache/overlayfs-py/pyfuse3/KEY``): a hash of
this script, every patch file, the interpreter, the libfuse build script and the libfuse
it builds against. A second checkout (a fresh clone, a git worktree) installs it in
seconds instead of compiling pyfuse3 (and libfuse) again, and any change to what the
build depends on changes the key.

Usage: build.py PYTHON   (installs into that interpreter's environment; no-op when the
installed pyfuse3 already is this build).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.5.0"
SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
HERE = Path(__file__).resolve().parent
PATCH_DIR = HERE / "patches"
LIBFUSE_BUILD = HERE.parent / "libfuse" / "build.py"


def _libfuse():
    spec = importlib.util.spec_from_file_location("overlayfs_py_vendor_libfuse", LIBFUSE_BUILD)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def patches() -> list[Path]:
    """The patch series, in the order it is applied (by its NNNN- prefix)."""
    found = sorted(PATCH_DIR.glob("*.patch"))
    for p in found:
        if not (p.name[:4].isdigit() and p.name[4] == "-"):
            sys.exit(f"vendor/pyfuse3: {p.name}: patch names are NNNN-name.patch")
    return found


def build_key(python: str, series: list[Path], libfuse_identity: str) -> str:
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    h = hashlib.sha256()
    for part in [Path(__file__).read_bytes(), tag.encode(), LIBFUSE_BUILD.read_bytes(),
                 libfuse_identity.encode()] + \
            [p.name.encode() + b"\0" + p.read_bytes() for p in series]:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def installed_build(python: str, why: bool = False) -> str:
    """The build key of the installed pyfuse3: '' for a stock one or none; with ``why``,
    the reason it does not import."""
    probe = "import pyfuse3; print(getattr(pyfuse3, 'OVERLAYFS_PY_BUILD', ''))"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout.strip()
    return r.stderr.strip().splitlines()[-1] if why and r.stderr.strip() else ""


def apply_patches(src: Path, series: list[Path]) -> None:
    # GIT_CEILING_DIRECTORIES: never mistake a repository above the build dir for ours
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(src.parent))
    for p in series:
        r = subprocess.run(["git", "apply", "--whitespace=nowarn", str(p)], cwd=src, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"vendor/pyfuse3: patch {p.name} does not apply to pyfuse3 {VERSION}:\n"
                     f"{r.stderr.strip()}")


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"vendor/pyfuse3: cannot stamp {path.name}: is this pyfuse3 {VERSION}?")
    path.write_text(text.replace(old, new))


def stamp(src: Path, level: int, key: str) -> None:
    _replace_once(src / "src/pyfuse3/__init__.pyx", "ROOT_INODE = FUSE_ROOT_ID\n",
                  f"ROOT_INODE = FUSE_ROOT_ID\nOVERLAYFS_PY_PATCH = {level}\n"
                  f"OVERLAYFS_PY_BUILD = {key!r}\n")
    _replace_once(src / "PKG-INFO", f"\nVersion: {VERSION}\n",
                  f"\nVersion: {VERSION}+overlayfspy{level}\n")


def _safe_extract(tf: tarfile.TarFile, dest: Path) -> None:
    """extractall that refuses names leaving ``dest``. Python 3.12 and 3.11.4 have
    ``filter="data"`` for this; Debian 12's Python 3.11.2 does not, and its extractall()
    raises TypeError on the argument."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for m in tf.getmembers():
        target = (root / m.name).resolve()
        if root not in target.parents and target != root or m.issym() or m.islnk() \
                or m.isdev():
            sys.exit(f"vendor/pyfuse3: unexpected member {m.name!r} in the sdist")
    tf.extractall(dest)


def _wheel_cache(key: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "overlayfs-py" / "pyfuse3" / key


def _build_wheel(python: str, out: Path, series: list[Path], key: str, env: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build-") as tmp:
        tmp = Path(tmp)
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"pyfuse3=={VERSION}", "-d", str(tmp)],
                       check=True)
        sdist = tmp / f"pyfuse3-{VERSION}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"vendor/pyfuse3: {sdist.name} has sha256 {digest}, expected {SHA256}")
        with tarfile.open(sdist) as tf:
            _safe_extract(tf, tmp)
        src = tmp / f"pyfuse3-{VERSION}"
        apply_patches(src, series)
        stamp(src, len(series), key)
        print(f"vendor/pyfuse3: building pyfuse3 {VERSION} with {len(series)} overlayfs-py "
              f"patches (about a minute)", flush=True)
        staging = tmp / "wheel"
        subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                        str(staging), str(src)], check=True, env=dict(os.environ, **env))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, out)           # complete or absent, never half a cache entry
        except OSError:
            if not out.is_dir():              # another build won the race: keep its wheel
                raise


def main() -> None:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    series = patches()
    libfuse = _libfuse()
    lf = libfuse.configure(python)
    key = build_key(python, series, lf.identity)
    if installed_build(python) == key:
        return
    cache = _wheel_cache(key)
    wheels = sorted(cache.glob("pyfuse3-*.whl")) if cache.is_dir() else []
    if not wheels:
        lf = libfuse.ensure(python)     # builds a vendored libfuse only now, when needed
        print(f"vendor/pyfuse3: building against {lf.name}", flush=True)
        _build_wheel(python, cache, series, key, lf.env)
        wheels = sorted(cache.glob("pyfuse3-*.whl"))
    else:
        print(f"vendor/pyfuse3: installing the cached build {wheels[0]}", flush=True)
    # replace a stock pyfuse3 of the same version; pip resolves its dependency (trio)
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "pyfuse3"],
                   check=False, capture_output=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheels[0])], check=True)
    got = installed_build(python, why=True)
    if got != key:
        shutil.rmtree(cache, ignore_errors=True)     # never keep a wheel that does not work
        sys.exit(f"vendor/pyfuse3: the installed pyfuse3 is not build {key}: "
                 f"{got or 'a stock pyfuse3'}")


if __name__ == "__main__":
    main()
