"""git status in a mounted repository, twice (the first may rewrite the index)."""
import os
import shutil

from ..common import Metric, git_env
from . import workload


@workload("git", order=130, rows=lambda s: [
    Metric("git status, 1st", "s"), Metric("git status, 2nd", "s")])
def git(b, t, rows):
    env = git_env(b.fx.root)
    if t.kind == "plain":
        # the worktree in place, with a private copy of the index (git status may rewrite
        # the index; it must not touch the fixture)
        d = b.scratch()
        try:
            idx = os.path.join(d, "index")
            shutil.copy2(os.path.join(b.fx.gitrepo, ".git", "index"), idx)
            env["GIT_INDEX_FILE"] = idx
            return _git_twice(b, t, b.fx.gitrepo, env, rows)
        finally:
            b.remove(d)
    with b.view(t, [b.fx.gitrepo]) as v:
        return _git_twice(b, t, v.path, env, rows)


def _git_twice(b, t, path, env, rows):
    out = {}
    for name in rows:
        dt, text = b.timed_cmd(["git", "status", "--porcelain"], cwd=path, env=env)
        out[name] = dt
        b.check("git status: changed paths", t.name, len(text.splitlines()))
    return out
