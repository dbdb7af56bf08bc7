"""``image pull`` / ``push`` / ``list`` / ``rm`` / ``prune`` against a real registry: Debian's
docker-registry (distribution 2.8) on 127.0.0.1, seeded with ``skopeo copy`` from images
that podman builds here (on the cached debootstrap rootfs, see ``podman/podkit.py``).

Run under ``flock /work/wt/.podman.lock`` (podman). The module's fixture builds:
  localhost/reg-base   the debootstrap rootfs (one layer)
  localhost/reg-app    FROM base, one RUN (files added, removed, an opaque dir, a hard
                       link, a setuid file)          -> REG/test/app:1 (OCI, gzip)
  localhost/reg-other  FROM base, another RUN         -> REG/test/other:1 (Docker schema 2)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "podman"))

import podkit  # noqa: E402
import regkit  # noqa: E402
from conftest import require_fuse  # noqa: E402
from test_image_store import assert_store_clean, cli, one_line_error  # noqa: E402

pytestmark = [pytest.mark.mount, pytest.mark.slow]

APP_RUN = ("rm -f /etc/issue.net && rm -rf /usr/share/doc/tzdata && mkdir /usr/share/doc/tzdata"
           " && echo only > /usr/share/doc/tzdata/only && echo app > /srv/app.txt"
           " && ln /srv/app.txt /srv/app-link && cp /bin/true /usr/local/bin/suid"
           " && chmod 4755 /usr/local/bin/suid && mkdir -p /srv/deep/er && echo x > /srv/deep/er/x")
OTHER_RUN = "echo other > /srv/other.txt && rm -f /etc/motd"


class World:
    def __init__(self, pod, reg, root):
        self.pod = pod
        self.reg = reg
        self.root = root

    def ref(self, repo: str, host: str = None) -> str:
        return f"{host or self.reg.host}/{repo}"


def _build(pod, ctx: Path, tag: str, run: str) -> None:
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Containerfile").write_text(f"FROM localhost/reg-base\nRUN {run}\n")
    pod("build", "-q", "--network", "none", "-t", tag, str(ctx), timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the registry tests need root (podman, docker-registry)")
    require_fuse()
    try:
        regkit.ensure_tools()
        podkit.ensure_tools()
        rootfs = podkit.ensure_rootfs()
    except (regkit.Unavailable, podkit.Unavailable) as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("registry")
    t0 = time.monotonic()
    pod = podkit.Podman(root / "podman", podkit.MountProgram(None, None, "overlay", ()))
    reg = regkit.RegistryServer(root / "registry")
    problems = []
    try:
        pod("import", "-q", str(rootfs.tar), "localhost/reg-base")
        _build(pod, root / "ctx-app", "localhost/reg-app", APP_RUN)
        _build(pod, root / "ctx-other", "localhost/reg-other", OTHER_RUN)
        reg.start()
        for name, repo, extra in (("reg-app", "test/app:1", []),
                                  ("reg-other", "test/other:1", ["--format", "v2s2"])):
            archive = root / f"{name}.tar"
            pod("save", "-q", "--format", "oci-archive", "-o", str(archive), f"localhost/{name}")
            regkit.skopeo("copy", "-q", "--dest-tls-verify=false", *extra,
                          f"oci-archive:{archive}", f"docker://{reg.host}/{repo}",
                          policy_dir=root)
            archive.unlink()
        print(f"\n[registry] fixture ready in {time.monotonic() - t0:.1f} s")
        yield World(pod, reg, root)
    finally:
        reg.stop()
        problems = pod.cleanup()
    if problems:
        pytest.fail("podman cleanup found leaks:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


def pull(store, ref, *extra, check=True, **kw):
    r = cli("image", "pull", "--store", store, ref, *extra, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def listing(store) -> dict:
    r = cli("image", "list", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class ImageMount:
    """``overlayfs-py image mount`` (daemon mode), unmounted on exit."""

    def __init__(self, store, ref, mnt: Path):
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        r = cli("image", "mount", "--store", store, ref, mnt)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)

    def __enter__(self):
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        deadline = time.monotonic() + 10
        while os.path.ismount(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def wait_unleased(store, timeout=10.0):
    """The daemon releases its leases when it exits, shortly after the unmount."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(l["in_use"] for l in listing(store)["layers"]):
            return
        time.sleep(0.1)
    raise AssertionError("layers still leased after the unmount")


def podman_tree(pod, image: str) -> dict:
    path = pod.out("image", "mount", image).strip()
    try:
        return regkit.tree(Path(path))
    finally:
        pod("image", "unmount", image)


# --------------------------------------------------------------------------- pull + mount

def test_pull_then_mount_is_podmans_tree(world, store, tmp_path):
    ref = world.ref("test/app:1")
    r = pull(store, ref)
    assert r.stdout.startswith(f"{ref} sha256:"), r.stdout
    assert "2 layers, 2 fetched" in r.stdout, r.stdout
    assert r.stderr == ""                       # not a terminal: no progress bars
    assert_store_clean(store)
    doc = listing(store)
    assert [i["name"] for i in doc["images"]] == [ref]
    assert doc["images"][0]["layers"] == 2 and doc["images"][0]["size"] > 50 << 20
    assert len(doc["layers"]) == 2 and all(l["images"] == [ref] for l in doc["layers"])
    want = podman_tree(world.pod, "localhost/reg-app")
    with ImageMount(store, ref, tmp_path / "mnt") as mnt:
        got = regkit.tree(mnt)
        assert (mnt / "srv" / "app.txt").read_text() == "app\n"
        assert os.stat(mnt / "srv" / "app.txt").st_ino == os.stat(mnt / "srv" / "app-link").st_ino
    assert not (set(got) ^ set(want)), sorted(set(got) ^ set(want))[:20]
    diff = [(p, got[p], want[p]) for p in sorted(want) if got[p] != want[p]]
    assert not diff, diff[:10]
    assert "usr/share/doc/tzdata/only" in got and "etc/issue.net" not in got
    assert got["usr/local/bin/suid"][1] == 0o4755


def test_docker_schema2_image_and_short_names(world, store, tmp_path):
    """The Docker schema 2 image; mounted by a name without its tag (":latest" is not
    implied here: the record is found by the name pulled)."""
    ref = world.ref("test/other:1")
    r = pull(store, ref, "--json")
    doc = json.loads(r.stdout)
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc["name"] == ref and len(doc["layers"]) == 2
    r = pull(store, ref)                        # again: nothing fetched
    assert "0 fetched" in r.stdout and "2 already in the store" in r.stdout, r.stdout
    with ImageMount(store, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "srv" / "other.txt").read_text() == "other\n"
        assert not (mnt / "etc" / "motd").exists()


def test_shared_base_fetches_only_the_new_layer(world, store):
    pull(store, world.ref("test/app:1"))
    before = world.reg.blob_gets()
    r = pull(store, world.ref("test/other:1"), "--json")
    fetched_now = world.reg.blob_gets()[len(before):]
    doc = json.loads(r.stdout)
    base, top = doc["layers"]
    assert not base["fetched"] and top["fetched"], doc
    # the registry served exactly the config and the new layer
    assert sorted(fetched_now) == sorted([doc["config"], top["digest"]]), fetched_now
    assert len(listing(store)["layers"]) == 3


def test_interrupted_pull_then_pull_again(world, store, tmp_path):
    ref = world.ref("test/app:1")
    env = dict(os.environ)
    env.pop("OVERLAYFS_PY_STORE", None)
    proc = subprocess.Popen([sys.executable, "-m", "overlayfs_py", "image", "pull", "--store",
                             str(store), "--jobs", "1", ref], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = store / "tmp"
            sizes = [f.stat().st_size for d in (tmp.iterdir() if tmp.exists() else [])
                     if d.name.startswith("blob-") for f in d.iterdir()]
            if sizes and max(sizes) > (4 << 20):
                killed_at = max(sizes)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert killed_at, "the pull finished before it could be killed mid-blob"
    # Nothing looks complete: no image record; the layer being fetched is not there.
    doc = listing(store)
    assert doc["images"] == []
    assert len(doc["layers"]) < 2
    assert doc["blobs"]["count"] < 2
    assert_store_clean(store)                   # the next store user removed the leftovers
    r = pull(store, ref, "--json")
    pulled = json.loads(r.stdout)
    assert all(l["fetched"] or not l["unpacked_now"] for l in pulled["layers"])
    assert_store_clean(store)
    with ImageMount(store, ref, tmp_path / "mnt") as mnt:
        assert "bookworm" in (mnt / "etc" / "os-release").read_text()
        assert (mnt / "srv" / "app.txt").read_text() == "app\n"


@pytest.mark.parametrize("what,min_size", [("layer", 1 << 20), ("config", 100)])
def test_corrupted_blob_is_refused_and_nothing_stored(world, store, what, min_size):
    """A proxy flips one bit of every blob of at least min_size bytes: the big layer
    (its gzip stream may break first: the error still blames the registry's bytes), or
    the config (and the layers)."""
    with regkit.Proxy(world.reg.port, flip_blob_byte=min_size) as proxy:
        r = pull(store, world.ref("test/app:1", proxy.host), check=False)
    assert proxy.corrupted, "the proxy corrupted nothing"
    one_line_error(r, "the registry sent different content")
    assert f"{what} sha256:" in r.stderr or what == "layer", r.stderr
    doc = listing(store)
    assert doc["images"] == [], doc
    if what == "layer":
        # the small top layer may have been stored (it is whole and verified, and fetched
        # in parallel); never the corrupted base layer
        assert len(doc["layers"]) <= 1 and doc["blobs"]["count"] <= 1, doc
        assert all(l["size"] < (1 << 20) for l in doc["layers"]), doc
    else:
        assert doc["layers"] == [] and doc["blobs"]["count"] == 0, doc
    assert_store_clean(store)


# --------------------------------------------------------------------------- list/rm/prune

def test_rm_and_prune_never_remove_a_layer_a_mount_uses(world, store, tmp_path):
    app, other = world.ref("test/app:1"), world.ref("test/other:1")
    pull(store, app)
    pull(store, other)
    doc = listing(store)
    assert len(doc["images"]) == 2 and len(doc["layers"]) == 3
    shared = [l for l in doc["layers"] if len(l["images"]) == 2]
    assert len(shared) == 1
    app_top = [l["diff_id"] for l in doc["layers"] if l["images"] == [app]]
    with ImageMount(store, app, tmp_path / "mnt") as mnt:
        r = cli("image", "rm", "--store", store, app, "--json")
        assert r.returncode == 0, r.stderr
        removed = json.loads(r.stdout)
        assert removed["images"] == [app]
        assert removed["layers"] == []                       # shared: other; top: mounted
        assert removed["kept_in_use"] == app_top
        r = cli("image", "prune", "--store", store, "--json")
        assert json.loads(r.stdout)["kept_in_use"] == app_top
        assert (mnt / "srv" / "app.txt").read_text() == "app\n"   # still served
    wait_unleased(store)
    r = cli("image", "prune", "--store", store, "--json")
    assert json.loads(r.stdout)["layers"] == app_top
    doc = listing(store)
    assert [i["name"] for i in doc["images"]] == [other] and len(doc["layers"]) == 2
    r = cli("image", "rm", "--store", store, "test/nonesuch")
    one_line_error(r, "no image 'test/nonesuch'")
    r = cli("image", "rm", "--store", store, other)
    assert r.returncode == 0, r.stderr
    doc = listing(store)
    assert doc["images"] == [] and doc["layers"] == [] and doc["blobs"]["count"] == 0


# --------------------------------------------------------------------------- push

def test_commit_push_pull_back_by_digest(world, store, tmp_path):
    reg = world.reg
    base_ref = world.ref("test/app:1")
    pull(store, base_ref)
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir(), work.mkdir(), mnt.mkdir()
    r = cli("image", "mount", "--store", store, base_ref, mnt, "--upper", upper, "--work", work)
    assert r.returncode == 0, r.stderr
    try:
        (mnt / "srv" / "committed.txt").write_text("committed\n")
        (mnt / "srv" / "app.txt").write_text("changed\n")
        os.unlink(mnt / "etc" / "issue")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    # overlayfs-py commit: the upper as a new layer on the pulled image (its blobs are in
    # the store), into an OCI layout
    layout = tmp_path / "layout"
    r = cli("commit", upper, "--to", f"{layout}:v2", "--from", base_ref, "--store", store,
            "--json")
    assert r.returncode == 0, r.stderr
    digest = json.loads(r.stdout)["manifest"]["digest"]
    patches = len(reg.requests("PATCH", "/test/app/blobs/uploads/"))
    # To the same repository: the image's two layers are there (HEAD), the new layer goes
    # up in 128-byte chunks (PATCH), as does the config.
    r = cli("image", "push", f"{layout}:v2", world.ref("test/app:2"), "--chunk-size", "128")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{world.ref('test/app:2')} {digest}: "), r.stdout
    assert "2 blobs uploaded, 2 already there" in r.stdout, r.stdout
    assert len(reg.requests("PATCH", "/test/app/blobs/uploads/")) - patches >= 2
    assert reg.requests("HEAD", "/test/app/blobs/sha256:", 200)
    # To a new repository: every blob monolithic.
    r = cli("image", "push", f"{layout}:v2", world.ref("test/fresh:1"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["digest"] == digest and len(doc["uploaded"]) == 4 and doc["skipped"] == []
    # skopeo sees the image; we pull it back by digest; podman runs it.
    ins = json.loads(regkit.skopeo("inspect", "--tls-verify=false",
                                   f"docker://{reg.host}/test/app@{digest}",
                                   policy_dir=tmp_path).stdout)
    assert ins["Digest"] == digest and len(ins["Layers"]) == 3 and "2" in ins["RepoTags"]
    store2 = tmp_path / "store2"
    by_digest = f"{reg.host}/test/fresh@{digest}"
    r = pull(store2, by_digest)
    assert r.stdout.startswith(f"{by_digest} {digest}: 3 layers"), r.stdout
    with ImageMount(store2, by_digest, tmp_path / "mnt2") as m2:
        assert (m2 / "srv" / "committed.txt").read_text() == "committed\n"
        assert (m2 / "srv" / "app.txt").read_text() == "changed\n"
        assert not (m2 / "etc" / "issue").exists()
    out = world.pod.out("run", "--rm", "--network", "none", "--tls-verify=false",
                        f"{reg.host}/test/app@{digest}", "sh", "-c",
                        "cat /srv/committed.txt /srv/app.txt; ls /etc/issue 2>&1 || true",
                        timeout=300)
    assert out.startswith("committed\nchanged\n") and "No such file" in out, out


def test_multi_platform_index(world, store, tmp_path):
    import imagekit
    from imagekit import F, make_tar
    lay = imagekit.Layout(tmp_path / "multi")
    amd = lay.write_image([make_tar([F("arch", "amd64\n")])], tag=None, architecture="amd64")
    arm = lay.write_image([make_tar([F("arch", "arm64\n")])], tag=None, architecture="arm64")
    index = lay.write_index([(amd, {"os": "linux", "architecture": "amd64"}),
                             (arm, {"os": "linux", "architecture": "arm64",
                                    "variant": "v8"})], tag="multi")
    r = cli("image", "push", f"{tmp_path / 'multi'}:multi", world.ref("test/multi:1"))
    assert r.returncode == 0, r.stderr
    assert index in r.stdout
    r = pull(store, world.ref("test/multi:1"), "--json")
    assert json.loads(r.stdout)["manifest"] == amd.manifest      # this machine: linux/amd64
    r = pull(store, world.ref("test/multi:1"), "--platform", "linux/arm64", "--json")
    assert json.loads(r.stdout)["manifest"] == arm.manifest
    with ImageMount(store, world.ref("test/multi:1"), tmp_path / "mnt") as mnt:
        assert (mnt / "arch").read_text() == "arm64\n"             # the last pull's record
    r = pull(store, world.ref("test/multi:1"), "--platform", "linux/s390x", check=False)
    one_line_error(r, "no image for platform linux/s390x")


# --------------------------------------------------------------------------- auth

def _auth_env(tmp_path, authfile=None) -> dict:
    """No credentials but those the test gives: a private HOME and runtime dir."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
           "XDG_CONFIG_HOME": str(home / ".config"), "DOCKER_CONFIG": str(home / ".docker")}
    env["REGISTRY_AUTH_FILE"] = str(authfile or home / "auth.json")
    return env


def test_htpasswd_basic_auth(world, store, tmp_path):
    hp = regkit.htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    sec = regkit.RegistryServer(tmp_path / "secure", htpasswd=hp, storage=world.reg.storage)
    sec.start()
    try:
        ref = f"{sec.host}/test/other:1"
        authfile = tmp_path / "home" / "auth.json"
        env = _auth_env(tmp_path, authfile)
        r = pull(store, ref, check=False, env=env)
        one_line_error(r, "401 unauthorized")
        assert "no credentials" in r.stderr and str(authfile) in r.stderr
        authfile.write_text(json.dumps({"auths": {sec.host: {"auth": __import__("base64")
                                       .b64encode(b"alice:wrong").decode()}}}))
        r = pull(store, ref, check=False, env=env)
        one_line_error(r, "401 unauthorized")
        assert f"user 'alice' from {authfile}" in r.stderr
        r = pull(store, ref, "--creds", "alice:nope", check=False, env=env)
        one_line_error(r, "user 'alice' from the command line")
        authfile.unlink()
        r = cli("image", "login", sec.host, "-u", "alice", "--password-stdin",
                input="wrong\n", env=env)
        one_line_error(r, "login refused (401)")
        assert not authfile.exists()
        r = cli("image", "login", sec.host, "-u", "alice", "--password-stdin",
                input="s3cret\n", env=env)
        assert r.returncode == 0 and str(authfile) in r.stdout, r.stderr
        assert authfile.stat().st_mode & 0o777 == 0o600
        r = pull(store, ref, env=env)
        assert "2 layers" in r.stdout
        r = cli("image", "push", f"oci:{_small_layout(tmp_path)}:small",
                f"{sec.host}/test/pushed-with-auth:1", env=env)
        assert r.returncode == 0, r.stderr
        r = cli("image", "logout", sec.host, env=env)
        assert r.returncode == 0, r.stderr
        r = pull(store, ref, check=False, env=env)
        one_line_error(r, "no credentials")
    finally:
        sec.stop()


def _small_layout(tmp_path, tag="small", content="small\n") -> Path:
    import imagekit
    from imagekit import F, make_tar
    path = tmp_path / f"layout-{tag}"
    lay = imagekit.Layout(path)
    lay.write_image([make_tar([F("small.txt", content + tag)])], tag=tag)
    return path


def test_bearer_token_auth(world, store, tmp_path):
    env = _auth_env(tmp_path)
    with regkit.TokenProxy(world.reg.port) as tp:             # anonymous tokens
        r = pull(store, f"{tp.host}/test/other:1", env=env)
        assert "2 layers" in r.stdout
        scopes = [q.get("scope", [""])[0] for q in tp.token_requests]
        assert "repository:test/other:pull" in scopes and tp.challenged >= 1
    with regkit.TokenProxy(world.reg.port, credentials=("bob", "pw")) as tp:
        r = pull(tmp_path / "s2", f"{tp.host}/test/other:1", check=False, env=env)
        one_line_error(r, "the token server refused (401)")
        assert "no credentials" in r.stderr
        r = pull(tmp_path / "s2", f"{tp.host}/test/other:1", "--creds", "bob:pw", env=env)
        assert "2 layers" in r.stdout
        r = cli("image", "push", f"{_small_layout(tmp_path)}:small", f"{tp.host}/test/tok:1",
                "--creds", "bob:pw", env=env)
        assert r.returncode == 0, r.stderr
        assert any("push" in q.get("scope", [""])[0] for q in tp.token_requests)
        r = cli("image", "login", tp.host, "-u", "bob", "--password-stdin", input="bad\n",
                env=env)
        one_line_error(r, "login refused (401)")


# --------------------------------------------------------------------------- errors

def test_errors_are_one_line_and_store_nothing(world, store, tmp_path):
    def fails(ref, needle, *extra):
        r = pull(store, ref, *extra, check=False)
        one_line_error(r, needle)
        doc = listing(store)
        assert doc["images"] == [] and doc["layers"] == [] and doc["blobs"]["count"] == 0
        assert_store_clean(store)
        return r
    fails("nosuch.invalid/test/app:1", "registry nosuch.invalid: unknown host")
    fails(f"127.0.0.1:{regkit.free_port()}/test/app:1", "connection refused", "--retries", "0")
    with regkit.Silent() as silent:
        t0 = time.monotonic()
        fails(f"127.0.0.1:{silent.port}/test/app:1", "timed out", "--timeout", "0.5",
              "--retries", "1")
        assert time.monotonic() - t0 < 30
    fails(world.ref("test/app:nope"), "no tag 'nope' in repository 'test/app'")
    with regkit.Proxy(world.reg.port, content_type="application/vnd.docker.distribution"
                      ".manifest.v1+prettyjws") as proxy:
        fails(world.ref("test/app:1", proxy.host), "unsupported manifest media type")
    # 404 for a blob: a small image whose layer blob vanished from the registry's storage
    layout = _small_layout(tmp_path, "gone", "gone\n")
    r = cli("image", "push", f"{layout}:gone", world.ref("test/gone:1"), "--json")
    assert r.returncode == 0, r.stderr
    index = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs" / "sha256" /
                      index["manifests"][0]["digest"].split(":")[1]).read_text())
    hexd = man["layers"][0]["digest"].split(":")[1]
    data = world.reg.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data.unlink()
    fails(world.ref("test/gone:1"), f"blob sha256:{hexd} not found")


def test_disk_full_during_a_pull(world, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        store = small / "store"
        r = pull(store, world.ref("test/app:1"), check=False)
        one_line_error(r, "disk full while pulling")
        doc = listing(store)
        assert doc["images"] == []
        assert all(l["size"] < (1 << 20) for l in doc["layers"])   # never the big one
        assert_store_clean(store)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_proxy_from_the_environment(world, store, tmp_path):
    layout = _small_layout(tmp_path, "viaproxy")
    r = cli("image", "push", f"{layout}:viaproxy", world.ref("test/viaproxy:1"))
    assert r.returncode == 0, r.stderr
    with regkit.Proxy(world.reg.port) as proxy:
        via = f"http://{proxy.host}"
        env = {"HTTP_PROXY": via, "HTTPS_PROXY": via, "http_proxy": via, "https_proxy": via,
               "NO_PROXY": "", "no_proxy": ""}
        r = pull(store, world.ref("test/viaproxy:1"), env=env)
        assert any(f"//{world.reg.host}/v2/test/viaproxy/manifests/1" in f
                   for f in proxy.forwarded), proxy.forwarded
