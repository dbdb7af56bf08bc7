"""xattrform.choose: which overlay xattrs a mount writes (no mount needed; the EPERM of
a user who may not write trusted.* is simulated). The real thing, as a real user, is in
test_nonroot_mount.py."""
from __future__ import annotations

import errno
import os

import pytest

from overlayfs_py import xattrform
from overlayfs_py.config import ConfigError, parse_argv


@pytest.fixture
def dirs(tmp_path):
    for n in ("l", "u", "w", "m"):
        (tmp_path / n).mkdir()
    return tmp_path


def cfg(d, extra=""):
    return parse_argv(["-o", f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w{extra}", f"{d}/m"])


def no_trusted(monkeypatch):
    """setxattr as for a user who is not root: trusted.* refused with EPERM."""
    real = os.setxattr

    def refuse(fd, name, value, *a, **kw):
        if name.startswith("trusted."):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real(fd, name, value, *a, **kw)
    monkeypatch.setattr(xattrform.os, "setxattr", refuse)


def test_probe_leaves_nothing_behind(dirs):
    fd = os.open(dirs / "w", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert xattrform.trusted_writable(fd) is (os.geteuid() == 0)
    finally:
        os.close(fd)
    assert os.listdir(dirs / "w") == []


@pytest.mark.parametrize("extra", ["", ",redirect_dir=off", ",redirect_dir=nofollow",
                                   ",metacopy=off"])
def test_defaults_fall_back_quietly(dirs, monkeypatch, extra):
    no_trusted(monkeypatch)
    fd = os.open(dirs / "w", os.O_RDONLY | os.O_DIRECTORY)
    try:
        c = xattrform.choose(cfg(dirs, extra), fd)
    finally:
        os.close(fd)
    assert c.userxattr and c.redirect_dir == "nofollow" and not c.metacopy
    assert os.listdir(dirs / "w") == []


@pytest.mark.parametrize("extra", [",redirect_dir=on", ",redirect_dir=follow", ",metacopy=on"])
def test_explicit_conflicts_fail(dirs, monkeypatch, extra):
    no_trusted(monkeypatch)
    fd = os.open(dirs / "w", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ConfigError, match="conflicting options"):
            xattrform.choose(cfg(dirs, extra), fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="root writes trusted.* xattrs")
def test_root_keeps_trusted_and_its_options(dirs):
    fd = os.open(dirs / "w", os.O_RDONLY | os.O_DIRECTORY)
    try:
        c = xattrform.choose(cfg(dirs, ",redirect_dir=on,metacopy=on"), fd)
    finally:
        os.close(fd)
    assert not c.userxattr and c.redirect_dir == "on" and c.metacopy
