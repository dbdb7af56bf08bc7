#!/usr/bin/env python3
"""A libfuse >= 3.16 for pyfuse3 to build against: FUSE passthrough needs it.

libfuse has the passthrough API from 3.16 (``FUSE_CAP_PASSTHROUGH``, ``backing_id`` in
``fuse_file_info``, ``max_backing_stack_depth``); Debian 12 ships 3.14. So:

- If the system's libfuse (``pkg-config fuse3``) is 3.16 or later, pyfuse3 uses it, as a
  stock pyfuse3 would.
- Otherwise we build libfuse 3.17.2 from Debian's source tarball of it (the upstream
  release, pinned by sha256), with meson and ninja from PyPI installed into the venv, as a
  *static, position-independent* library installed into the venv (``lib/libfuse3.a``,
  ``include/fuse3``, ``lib/pkgconfig/fuse3.pc``). pyfuse3 links it in: its extension module
  then loads no libfuse at run time, so there is no rpath or LD_LIBRARY_PATH to get
  right, no clash with the system's libfuse3.so.3 (which stays for fusermount3 and other
  programs), and a cached pyfuse3 wheel works in any venv. Only the library is built
  (no utils): mounting as a non-root user still goes through the system's setuid
  ``fusermount3``, whose directory is compiled in (``FUSERMOUNT_DIR``; libfuse falls back
  to ``$PATH``). Symbol versioning is off (libfuse's own option for libcs without it): the
  archive's versioned aliases cannot be linked into another shared object, and nothing
  else links against this copy.

``configure(python)`` returns what the pyfuse3 build needs (environment and an identity
for its cache key) without building; ``ensure(python)`` builds when needed.
Usage: build.py PYTHON   (builds and installs into that interpreter's venv if needed).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MIN_VERSION = "3.16"
VERSION = "3.17.2"
URL = f"https://deb.debian.org/debian/pool/main/f/fuse3/fuse3_{VERSION}.orig.tar.gz"
SHA256 = "3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f"
# meson and ninja from PyPI, into the venv; their versions do not change the library
BUILD_TOOLS = ("meson>=1.1", "ninja")
MESON_OPTIONS = ("--buildtype=release", "--libdir=lib", "-Ddefault_library=static",
                 "-Dutils=false", "-Dexamples=false", "-Dtests=false",
                 "-Ddisable-libc-symbol-version=true")


@dataclass
class Libfuse:
    name: str                           # for people
    identity: str                       # goes into pyfuse3's build key
    env: dict = field(default_factory=dict)   # for building pyfuse3 against it
    prefix: Path | None = None          # where a vendored build goes (None: the system's)


def _say(msg: str) -> None:
    print(f"vendor/libfuse: {msg}", flush=True)


def system_version() -> str | None:
    """The system libfuse's version if it is recent enough, else None."""
    try:
        ok = subprocess.run(["pkg-config", f"--atleast-version={MIN_VERSION}", "fuse3"])
        if ok.returncode != 0:
            return None
        return subprocess.run(["pkg-config", "--modversion", "fuse3"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def venv_prefix(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return Path(out)


def fusermount_dir() -> str:
    found = shutil.which("fusermount3")
    return str(Path(found).resolve().parent) if found else "/usr/bin"


def configure(python: str) -> Libfuse:
    if os.environ.get("OVERLAYFS_PY_VENDOR_LIBFUSE") != "1":   # force the build (testing)
        v = system_version()
        if v is not None:
            return Libfuse(name=f"the system's libfuse {v}", identity=f"system libfuse {v}")
    prefix = venv_prefix(python)
    pc = prefix / "lib" / "pkgconfig"
    env = {"PKG_CONFIG_PATH": os.pathsep.join(
               [str(pc)] + [p for p in [os.environ.get("PKG_CONFIG_PATH")] if p]),
           # keep libfuse's symbols inside pyfuse3's extension module
           "LDFLAGS": " ".join([os.environ.get("LDFLAGS", ""),
                                "-Wl,--exclude-libs,ALL"]).strip()}
    script = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    ident = " ".join((f"libfuse {VERSION} sha256:{SHA256[:16]} static build.py:{script}",
                      f"fusermount:{fusermount_dir()}") + MESON_OPTIONS)
    return Libfuse(name=f"libfuse {VERSION} (static, {prefix})", identity=ident, env=env,
                   prefix=prefix)


def _stamp_file(prefix: Path) -> Path:
    return prefix / "lib" / "libfuse3.overlayfs-py"


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "overlayfs-py" / "libfuse"


def _tarball() -> Path:
    """The pinned source tarball, downloaded once into the cache and checked every time."""
    path = _cache_dir() / URL.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _say(f"downloading {URL}")
        tmp = path.with_name(path.name + f".{os.getpid()}.part")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        path.unlink()
        sys.exit(f"vendor/libfuse: {path.name} has sha256 {digest}, expected {SHA256}")
    return path


def _extract(tarball: Path, dest: Path) -> Path:
    """Regular files and directories inside ``dest`` only (what this tarball holds; Debian
    12's Python 3.11.2 has no ``extractall(filter=)``)."""
    root = dest.resolve()
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            target = (root / m.name).resolve()
            if root not in target.parents or not (m.isfile() or m.isdir()):
                sys.exit(f"vendor/libfuse: unexpected member {m.name!r} in {tarball.name}")
        tf.extractall(dest)
    return dest / f"fuse-{VERSION}"


def _link_archive_by_path(pc: Path) -> None:
    """``-L${libdir} -lfuse3`` lets the linker pick the first libfuse3 on its search path,
    and Debian's Python puts /usr/lib/x86_64-linux-gnu (libfuse3.so, 3.14) before ours:
    name the archive itself instead."""
    text = pc.read_text()
    old = "-L${libdir} -lfuse3 "
    if text.count(old) != 1:
        sys.exit(f"vendor/libfuse: unexpected Libs line in {pc}")
    pc.write_text(text.replace(old, "${libdir}/libfuse3.a "))


def ensure(python: str) -> Libfuse:
    """configure(), and build the vendored libfuse into the venv unless it is there."""
    lf = configure(python)
    if lf.prefix is None:
        return lf
    stamp = _stamp_file(lf.prefix)
    if stamp.exists() and stamp.read_text() == lf.identity:
        return lf
    bindir = Path(python).parent
    subprocess.run([python, "-m", "pip", "install", "--quiet", *BUILD_TOOLS], check=True)
    tools_env = dict(os.environ, PATH=os.pathsep.join([str(bindir), os.environ["PATH"]]))
    src_tar = _tarball()
    _say(f"building libfuse {VERSION} (static) into {lf.prefix}")
    with tempfile.TemporaryDirectory(prefix="libfuse-build-") as tmp:
        src = _extract(src_tar, Path(tmp))
        build = Path(tmp) / "build"
        subprocess.run([str(bindir / "meson"), "setup", str(build), str(src),
                        f"--prefix={lf.prefix}", f"-Dbindir={fusermount_dir()}",
                        *MESON_OPTIONS], check=True, env=tools_env, stdout=subprocess.DEVNULL)
        subprocess.run([str(bindir / "meson"), "compile", "-C", str(build)], check=True,
                       env=tools_env, stdout=subprocess.DEVNULL)
        subprocess.run([str(bindir / "meson"), "install", "--quiet", "-C", str(build)],
                       check=True, env=tools_env, stdout=subprocess.DEVNULL)
    pc = lf.prefix / "lib" / "pkgconfig" / "fuse3.pc"
    _link_archive_by_path(pc)
    got = subprocess.run(["pkg-config", "--modversion", "fuse3"], capture_output=True,
                         text=True, env=dict(os.environ, **lf.env)).stdout.strip()
    if not pc.exists() or got != VERSION:
        sys.exit(f"vendor/libfuse: pkg-config finds libfuse {got or 'none'!r} after the "
                 f"build, expected {VERSION} from {pc}")
    stamp.write_text(lf.identity)
    return lf


if __name__ == "__main__":
    _say(ensure(sys.argv[1] if len(sys.argv) > 1 else sys.executable).name)
