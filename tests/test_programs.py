"""Real programs on the mount: tar, git, compileall, sqlite (journal and WAL), cp -a,
rsync -a, mv of a lower directory (EXDEV fallback) and the dpkg replace pattern.

Each result is checked against the same program run on a plain directory (or against
the program's own consistency check). ``OVL_TEST_PROG=kernel`` runs them on the kernel
overlay.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from layerkit import DIR, File, Hardlink, Symlink

pytestmark = pytest.mark.mount


@pytest.fixture
def ovl(make_layers, mounted, tmp_path):
    def make(*lowers, upper=True):
        stack = make_layers(*lowers, upper=upper)
        m = mounted(stack)
        return Path(wk.mp(m)), wk.upper_of(stack, m), stack

    with wk.watchdog(tmp_path, 300, "program test"):
        yield make


def run(cmd, cwd=None, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True,
                       shell=isinstance(cmd, str), **kw)
    assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def aged(root, t=1_500_000_000):
    """Give every entry of a tree the same old mtime (tools that compare times at second
    granularity, like rsync's quick check, then see real differences)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t), follow_symlinks=False)
    os.utime(root, (t, t))
    return root


def same_tree(a, b, times=False, what=""):
    sa = layerkit.snapshot(a, times=times)
    sb = layerkit.snapshot(b, times=times)
    sa.pop(".", None)
    sb.pop(".", None)
    d = layerkit.diff_snapshots(sa, sb, names=("expected", "mount"))
    assert not d, f"{what}:\n  " + "\n  ".join(d[:50])


SRC_TREE = {
    "usr/bin/tool": File(b"#!/bin/sh\necho new tool\n", mode=0o755),
    "usr/bin/tool2": Hardlink("usr/bin/tool"),
    "usr/share/doc/pkg/README": "new readme\n",
    "usr/share/doc/pkg/link": Symlink("README"),
    "usr/lib/libx.so.1": b"\x7fELF" + bytes(range(256)) * 64,
    "usr/lib/libx.so": Symlink("libx.so.1"),
    "etc/pkg.conf": File("conf=1\n", mode=0o600, uid=1000, gid=1000),
    "var/lib/pkg/": DIR,
}
OLD = 1_000_000_000        # lower files are old: rsync's quick check must see them differ
LOWER_SYS = {
    "usr/bin/tool": File(b"old tool\n", mode=0o755, mtime=OLD),
    "usr/bin/other": File("other\n", mtime=OLD),
    "usr/share/doc/pkg/README": File("old readme\n", mtime=OLD),
    "usr/share/doc/pkg/CHANGES": File("changes\n", mtime=OLD),
    "usr/share/doc/other/README": File("other readme\n", mtime=OLD),
    "usr/share/man/man1/tool.1": File("manpage\n", mtime=OLD),
    "etc/pkg.conf": File("conf=0\n", mtime=OLD),
    "etc/hosts": File("127.0.0.1 localhost\n", mtime=OLD),
}


def test_tar_unpack_over_lower(ovl, tmp_path):
    m, upper, stack = ovl(LOWER_SYS)
    src = layerkit.make_layer(tmp_path / "src", SRC_TREE)
    tarball = tmp_path / "pkg.tar"
    run(["tar", "--xattrs", "-cpf", str(tarball), "-C", str(src), "."])
    ref = layerkit.copy_tree(stack.lowers[0], tmp_path / "ref")
    run(["tar", "--xattrs", "-xpf", str(tarball), "-C", str(ref)])
    run(["tar", "--xattrs", "-xpf", str(tarball), "-C", str(m)])
    same_tree(ref, m, times=True, what="tar -x into the mount vs into a plain copy")
    assert wk.read_file(m / "usr/bin/tool") == b"#!/bin/sh\necho new tool\n"
    assert os.lstat(m / "usr/bin/tool").st_ino == os.lstat(m / "usr/bin/tool2").st_ino


def test_git_init_commit_clone_gc(ovl):
    m, upper, stack = ovl({"src/a.txt": "a\n", "src/sub/b.txt": "b\n"})
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "GIT_AUTHOR_DATE": "1700000000 +0000",
           "GIT_COMMITTER_DATE": "1700000000 +0000", "HOME": str(m),
           "GIT_CONFIG_NOSYSTEM": "1"}
    src = m / "src"
    run(["git", "init", "-q", "-b", "main"], cwd=src, env=env)
    run(["git", "add", "-A"], cwd=src, env=env)
    run(["git", "commit", "-q", "-m", "first"], cwd=src, env=env)
    for i in range(20):
        (src / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
        (src / "a.txt").write_text(f"a changed {i}\n")
        run(["git", "add", "-A"], cwd=src, env=env)
        run(["git", "commit", "-q", "-m", f"c{i}"], cwd=src, env=env)
    head = run(["git", "rev-parse", "HEAD"], cwd=src, env=env).strip()
    run(["git", "clone", "-q", str(src), str(m / "clone")], env=env)      # hard links
    run(["git", "clone", "-q", "--no-local", str(src), str(m / "clone2")], env=env)
    for d in ("clone", "clone2"):
        assert run(["git", "rev-parse", "HEAD"], cwd=m / d, env=env).strip() == head
        run(["git", "fsck", "--strict", "--no-progress"], cwd=m / d, env=env)
        assert (m / d / "a.txt").read_text() == "a changed 19\n"
    run(["git", "gc", "-q", "--prune=now"], cwd=src, env=env)                # deletes loose objects
    run(["git", "fsck", "--strict", "--no-progress"], cwd=src, env=env)
    assert run(["git", "status", "--porcelain"], cwd=src, env=env) == ""
    # the whole history reads back the same
    log = run(["git", "log", "--format=%H %s"], cwd=src, env=env)
    assert log.count("\n") == 21 and log.startswith(head)


def test_git_on_lower_repo(make_layers, mounted, tmp_path):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "GIT_AUTHOR_DATE": "1700000000 +0000",
           "GIT_COMMITTER_DATE": "1700000000 +0000", "HOME": str(tmp_path),
           "GIT_CONFIG_NOSYSTEM": "1"}
    stack = make_layers({"repo/f0": "0\n"}, upper=True)
    repo = stack.lowers[0] / "repo"
    for i in range(1, 10):
        (repo / f"f{i}").write_text(f"{i}\n")
    run(["git", "init", "-q", "-b", "main"], cwd=repo, env=env)
    run("git add -A && git commit -q -m base", cwd=repo, env=env)
    base = run(["git", "rev-parse", "HEAD"], cwd=repo, env=env).strip()
    with wk.watchdog(tmp_path, 300, "git on a lower repo"):
        m = Path(wk.mp(mounted(stack)))
        r = m / "repo"
        run(["git", "status", "--porcelain"], cwd=r, env=env)
        (r / "f3").write_text("changed\n")
        os.unlink(r / "f4")
        run("git add -A && git commit -q -m change", cwd=r, env=env)
        run(["git", "gc", "-q", "--prune=now"], cwd=r, env=env)
        run(["git", "fsck", "--strict", "--no-progress"], cwd=r, env=env)
        assert run(["git", "rev-parse", "HEAD~1"], cwd=r, env=env).strip() == base
        assert run(["git", "status", "--porcelain"], cwd=r, env=env) == ""
        assert run(["git", "show", "HEAD:f3"], cwd=r, env=env) == "changed\n"
    # the lower repository is untouched
    assert run(["git", "rev-parse", "HEAD"], cwd=repo, env=env).strip() == base
    run(["git", "fsck", "--no-progress"], cwd=repo, env=env)


def test_compileall_and_import(ovl):
    m, upper, stack = ovl({"pkg/__init__.py": "", "pkg/mod.py": "X = 41 + 1\n",
                           "pkg/sub/__init__.py": "from ..mod import X\nY = X * 2\n"})
    run([sys.executable, "-m", "compileall", "-q", str(m / "pkg")])
    pyc = list((m / "pkg/__pycache__").glob("mod.*.pyc"))
    assert pyc and (upper / "pkg/__pycache__" / pyc[0].name).exists()
    before = {p: os.stat(p).st_mtime_ns for p in (m / "pkg").rglob("*.pyc")}
    run([sys.executable, "-m", "compileall", "-q", str(m / "pkg")])
    after = {p: os.stat(p).st_mtime_ns for p in (m / "pkg").rglob("*.pyc")}
    assert before == after, "compileall rewrote up-to-date .pyc files"
    out = run([sys.executable, "-c", "import pkg.sub; print(pkg.sub.Y)"],
              env={"PYTHONPATH": str(m), "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.strip() == "84"
    assert not (stack.lowers[0] / "pkg/__pycache__").exists()


@pytest.mark.parametrize("journal", ["delete", "truncate", "wal"])
def test_sqlite(ovl, tmp_path, journal):
    ref = tmp_path / "ref.db"
    con = sqlite3.connect(ref)
    con.execute("create table t (id integer primary key, v text)")
    con.executemany("insert into t (v) values (?)", [(f"lower {i}",) for i in range(500)])
    con.commit()
    con.close()
    m, upper, stack = ovl({"db/lower.db": ref.read_bytes()})
    for name in ("lower.db", "new.db"):
        path = m / "db" / name
        con = sqlite3.connect(path, timeout=30)
        con.execute(f"pragma journal_mode={journal}")
        con.execute("pragma synchronous=full")
        con.execute("create table if not exists t (id integer primary key, v text)")
        reader = sqlite3.connect(path, timeout=30)
        for txn in range(20):
            with con:
                con.executemany("insert into t (v) values (?)",
                                [(f"txn {txn} row {i}" * 3,) for i in range(100)])
                con.execute("delete from t where id % 7 = ?", (txn % 7,))
            reader.execute("select count(*) from t").fetchone()
        with con:
            con.execute("update t set v = upper(v) where id % 3 = 0")
        # a rolled back transaction leaves nothing behind
        con.execute("begin")
        con.execute("delete from t")
        con.rollback()
        n = con.execute("select count(*) from t").fetchone()[0]
        assert n > 0
        con.execute("vacuum")
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        reader.close()
        con.close()
        con = sqlite3.connect(path)
        assert con.execute("select count(*) from t").fetchone()[0] == n
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        con.close()
    # the lower db is untouched
    con = sqlite3.connect(f"file:{stack.lowers[0] / 'db/lower.db'}?mode=ro", uri=True)
    assert con.execute("select count(*) from t").fetchone()[0] == 500
    con.close()


def test_cp_a_into_and_out_of_the_mount(ovl, tmp_path):
    m, upper, stack = ovl(LOWER_SYS)
    src = layerkit.make_layer(tmp_path / "src", SRC_TREE)
    run(["cp", "-a", str(src), str(m / "copy")])
    same_tree(src, m / "copy", times=True, what="cp -a into the mount")
    out = tmp_path / "out"
    run(["cp", "-a", str(m), str(out)])
    same_tree(m, out, times=True, what="cp -a of the merged view out of the mount")


def test_rsync_over_lower(ovl, tmp_path):
    m, upper, stack = ovl(LOWER_SYS)
    if not shutil.which("rsync"):
        pytest.skip("rsync not installed")
    src = aged(layerkit.make_layer(tmp_path / "src", SRC_TREE))
    run(["rsync", "-aHAX", "--delete", f"{src}/usr/", f"{m}/usr/"])
    same_tree(src / "usr", m / "usr", times=True, what="rsync -aHAX --delete over lower usr")
    # a second run has nothing to do
    out = run(["rsync", "-aHAXi", "--delete", f"{src}/usr/", f"{m}/usr/"])
    assert out.strip() == "", f"second rsync still changed things:\n{out}"
    assert (m / "etc/hosts").exists()


def test_mv_lower_directory(ovl, tmp_path):
    m, upper, stack = ovl(LOWER_SYS)
    ref = tmp_path / "ref"
    run(["cp", "-a", str(m / "usr/share"), str(ref)])
    r = subprocess.run(["mv", str(m / "usr/share"), str(m / "usr/share2")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(m / "usr/share")
    same_tree(ref, m / "usr/share2", times=True, what="mv of a lower dir (EXDEV fallback)")
    assert sorted(os.listdir(m / "usr")) == ["bin", "share2"]
    assert wk.is_whiteout(upper / "usr/share")
    # and a directory that is partly upper (merged)
    (m / "usr/bin/new").write_text("new\n")
    run(["cp", "-a", str(m / "usr/bin"), str(tmp_path / "ref2")])
    run(["mv", str(m / "usr/bin"), str(m / "bin2")])
    same_tree(tmp_path / "ref2", m / "bin2", times=True, what="mv of a merged dir")
    assert sorted(os.listdir(m / "usr")) == ["share2"]


def test_dpkg_style_replace(ovl):
    m, upper, stack = ovl(LOWER_SYS)
    script = """
    set -e
    cd "$1"
    for f in usr/bin/tool usr/share/doc/pkg/README etc/pkg.conf; do
        echo new > "$f.dpkg-new"
        mv "$f.dpkg-new" "$f"
    done
    test "$(cat usr/bin/tool)" = new
    rm usr/bin/tool usr/share/doc/pkg/README
    mv etc/pkg.conf etc/pkg.conf.dpkg-old
    rm etc/pkg.conf.dpkg-old
    """
    run(["sh", "-c", script, "sh", str(m)])
    for rel in ("usr/bin/tool", "usr/share/doc/pkg/README", "etc/pkg.conf"):
        assert not os.path.lexists(m / rel), rel
        assert wk.is_whiteout(upper / rel), rel
    assert sorted(os.listdir(m / "usr/bin")) == ["other"]
    assert sorted(os.listdir(m / "etc")) == ["hosts"]
    assert not any(".dpkg-" in p for p in wk.tree_paths(m))
    assert not any(".dpkg-" in p for p in wk.tree_paths(upper))
