"""The registry commands' command line: ``image pull``, ``push``, ``login``, ``logout``.

``overlayfs_py.image.cmdline`` builds the parser and calls ``add_parsers``; its ``main`` is the
one error boundary (one ``overlayfs-py: <reason>`` line, exit 1).
"""
from __future__ import annotations

import getpass
import sys

from ..progress import make_progress


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _registry_options(p, *, jobs: bool = True) -> None:
    p.add_argument("--authfile", metavar="FILE",
                   help="credentials file (default: $REGISTRY_AUTH_FILE, podman's auth.json, "
                        "~/.docker/config.json)")
    p.add_argument("--creds", metavar="USER[:PASSWORD]",
                   help="credentials to use instead of the auth files")
    p.add_argument("--insecure-registry", dest="insecure", action="append", default=[],
                   metavar="HOST[:PORT]",
                   help="allow plain HTTP and unverified TLS for this host (localhost always)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="per connect and per read (default 30)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries of a failed request or broken download (default 3)")
    if jobs:
        p.add_argument("--jobs", type=int, default=3, metavar="N",
                       help="parallel layer transfers (default 3)")


def _options(args):
    from .client import Options
    user = password = None
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        if not _:
            password = getpass.getpass(f"Password for {user}: ")
    kw = dict(authfile=args.authfile, username=user, password=password,
              insecure=tuple(args.insecure), timeout=args.timeout, retries=max(0, args.retries))
    if getattr(args, "jobs", None):
        kw["jobs"] = max(1, args.jobs)
    if getattr(args, "chunk_size", None):
        kw["chunk_size"] = max(1, args.chunk_size)
    return Options(**kw)


def add_parsers(isub, common) -> None:
    p = isub.add_parser("pull", help="pull an image from a registry into the store",
                        description="Fetch an image (OCI or Docker schema 2; one platform of "
                                    "a multi-platform index) into the store: layers the store "
                                    "has are not fetched again. Then 'image mount REF MNT'.")
    p.add_argument("reference", metavar="[HOST[:PORT]/]REPO[:TAG|@DIGEST]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--oci-markers", action="store_true",
                   help="unpack keeping the OCI .wh. markers (as image mount --oci-markers)")
    _registry_options(p)
    common(p)
    p.set_defaults(func=cmd_pull)

    p = isub.add_parser("push", help="push an image (an OCI layout) to a registry",
                        description="Upload the image's blobs the registry lacks, then its "
                                    "manifest.")
    p.add_argument("source", metavar="LAYOUT[:TAG]",
                   help="OCI layout dir (or an OCI/Docker archive, or a stored image)")
    p.add_argument("reference", metavar="[HOST[:PORT]/]REPO[:TAG]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--chunk-size", type=int, default=32 << 20, metavar="BYTES",
                   help="blobs larger than this are uploaded in chunks (default 32 MiB)")
    _registry_options(p)
    p.add_argument("--store", metavar="DIR", help="the store (for a stored image)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_push)

    p = isub.add_parser("login", help="store credentials for a registry",
                        description="Check the credentials against the registry and store "
                                    "them in the auth file podman uses.")
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="(visible to other users; prefer "
                                            "--password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from "
                                                                 "stdin")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="store the credentials without asking the registry")
    _registry_options(p, jobs=False)
    p.set_defaults(func=cmd_login)

    p = isub.add_parser("logout", help="remove stored credentials for a registry")
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("--authfile", metavar="FILE")
    p.set_defaults(func=cmd_logout)


def cmd_pull(args, mount) -> int:
    from ..cmdline import _print_json, warn
    from .pull import pull
    progress = make_progress(args.quiet)
    result = pull(args.reference, store=args.store, platform=args.platform,
                  options=_options(args), progress=progress, oci_markers=args.oci_markers)
    warn([w for l in result.layers for w in l.warnings if l.diff_id in result.unpacked])
    if args.json:
        _print_json(result.to_json())
    else:
        n = len(result.image.layers)
        sys.stdout.write(f"{result.name} {result.image.manifest_digest}: {n} layer"
                         f"{'s' if n != 1 else ''}, {len(result.fetched)} fetched "
                         f"({_human(result.downloaded)}), {n - len(result.unpacked)} already "
                         "in the store\n")
    return 0


def cmd_push(args, mount) -> int:
    from ..cmdline import _print_json
    from .push import push
    progress = make_progress(args.quiet)
    result = push(args.source, args.reference, store=args.store, options=_options(args),
                  progress=progress)
    if args.json:
        _print_json(result.to_json())
    else:
        sys.stdout.write(f"{result.reference} {result.digest}: {len(result.uploaded)} blob"
                         f"{'s' if len(result.uploaded) != 1 else ''} uploaded, "
                         f"{len(result.skipped)} already there\n")
    return 0


def cmd_login(args, mount) -> int:
    from ..cmdline import UsageError
    from . import login
    user = args.username
    if args.creds:
        user, _, pw = args.creds.partition(":")
        password = pw if _ else None
    else:
        password = args.password
    if args.password_stdin:
        if args.password is not None:
            raise UsageError("--password and --password-stdin exclude each other")
        password = sys.stdin.readline().rstrip("\n")
    if user is None:
        if not sys.stdin.isatty():
            raise UsageError("login: give --username (stdin is not a terminal)")
        user = input("Username: ")
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError("login: give --password-stdin (stdin is not a terminal)")
        password = getpass.getpass("Password: ")
    args.creds = None
    path = login(args.host, user, password, authfile=args.authfile, options=_options(args),
                 check=args.check)
    sys.stdout.write(f"Login succeeded: {args.host} (credentials in {path})\n")
    return 0


def cmd_logout(args, mount) -> int:
    from ..errors import NotFound
    from . import logout
    path = logout(args.host, authfile=args.authfile)
    if path is None:
        raise NotFound(f"not logged in to {args.host}")
    sys.stdout.write(f"Removed login credentials for {args.host} from {path}\n")
    return 0
