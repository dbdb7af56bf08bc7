"""The image commands' command line: ``overlayfs-py image ...``, ``diff``, ``commit``.

``overlayfs_py.cli`` hands us argv when its first word is one of ``COMMANDS`` (and no ``-o``
option names a ``lowerdir=``, which only the mount command line has). We parse it, call the
Python API (``api``, ``history``, ``diff``, ``commit``) and print. ``image mount`` prepares
the image (unpack, lease) and gives the plan to the ``mount`` callback that the CLI passes
in: mounting is the daemon's half, which this package never imports.

Exit status: 0 on success, 1 with one ``overlayfs-py: <reason>`` line on stderr for any bad
input or failure, 130 when interrupted. Warnings (things a layer holds that could not be
kept) are ``overlayfs-py: warning: ...`` lines on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from . import api
from .errors import ImageError
from .progress import make_progress

PROG = "overlayfs-py"
COMMANDS = ("image", "diff", "commit")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: Optional[str] = None):
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def err(msg: str) -> None:
    line = " ".join(str(msg).split()) or "unknown error"
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def warn(lines: Sequence[str]) -> None:
    for line in lines:
        err(f"warning: {line}")


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _common(p: argparse.ArgumentParser, *, platform: bool = True) -> None:
    p.add_argument("--store", metavar="DIR",
                   help="the store (default: $OVERLAYFS_PY_STORE, else /var/lib/overlayfs-py "
                        "for root, $XDG_DATA_HOME/overlayfs-py for others)")
    if platform:
        p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from a multi-platform image (default: this "
                            "machine's, linux)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Container images on overlayfs-py.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    image = sub.add_parser("image", help="read, unpack and mount images")
    isub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND",
                                parser_class=_Parser)
    isub.required = True

    m = isub.add_parser("mount", help="mount an image (read-only without --upper)",
                        description="Unpack what the store lacks and mount the image's layers "
                                    "(first layer of the manifest at the bottom). Returns once "
                                    "the mount is live; unmount with fusermount3 -u MNT.")
    m.add_argument("source", metavar="SOURCE[:TAG]",
                   help="OCI layout dir, OCI or Docker archive, or a stored image's name")
    m.add_argument("mountpoint", metavar="MNT")
    m.add_argument("--upper", metavar="DIR", help="writable layer (the container's)")
    m.add_argument("--work", metavar="DIR", help="work directory (same file system as "
                                                  "--upper)")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, as for the plain mount command")
    m.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", "--debug", action="store_true", help="debug log (implies -f)")
    m.add_argument("--oci-markers", action="store_true",
                   help="use layers that keep the OCI .wh. markers (unpacked apart)")
    _common(m)
    m.set_defaults(func=cmd_mount)

    u = isub.add_parser("unpack", help="unpack an image's layers into the store",
                        description="Unpack what the store lacks; print the lowerdir= list "
                                    "(top first) that mounts the image, e.g. with the kernel "
                                    "overlay.")
    u.add_argument("source", metavar="SOURCE[:TAG]")
    u.add_argument("--oci-markers", action="store_true",
                   help="keep the OCI .wh. markers instead of the kernel's format")
    u.add_argument("--json", action="store_true", help="machine-readable output")
    _common(u)
    u.set_defaults(func=cmd_unpack)

    h = isub.add_parser("history", help="how an image was built, top layer first",
                        description="One row per history entry of the image's config, top "
                                    "first: the layer's digest, when, the instruction that "
                                    "made it, and its size unpacked (0 for entries that made "
                                    "no layer).")
    h.add_argument("source", metavar="SOURCE[:TAG]")
    h.add_argument("--json", action="store_true", help="machine-readable output")
    h.add_argument("--no-trunc", action="store_true", help="do not shorten the columns")
    _common(h)
    h.set_defaults(func=cmd_history)

    d = sub.add_parser("diff", help="what an upper layer changed (A, C, D lines)",
                       description="The changes in UPPER, as docker diff shows them. Give the "
                                   "lower layers (--lower, top first, or --image) to tell "
                                   "added from changed paths exactly and, with --content, to "
                                   "leave out copy-ups that changed nothing.")
    d.add_argument("upper", metavar="UPPER")
    d.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer directory (repeat, top first)")
    d.add_argument("--image", metavar="SOURCE[:TAG]", help="the image the upper was used on")
    d.add_argument("--content", action="store_true",
                   help="only real changes: compare with the lower layers (xxhash of data)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    _common(d)
    d.set_defaults(func=cmd_diff)

    c = sub.add_parser("commit", help="write an upper layer as a new image layer",
                       description="Write UPPER as a new OCI layer on top of the --from "
                                   "image, with a new config and manifest, into the OCI "
                                   "layout LAYOUT (made if needed), tagged TAG (default "
                                   "latest). Deterministic; SOURCE_DATE_EPOCH clamps times.")
    c.add_argument("upper", metavar="UPPER")
    c.add_argument("--to", required=True, metavar="LAYOUT[:TAG]")
    c.add_argument("--from", dest="from_image", metavar="SOURCE[:TAG]",
                   help="the base image (without it: an image of this one layer)")
    c.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip")
    c.add_argument("-m", "--message", help="history comment")
    c.add_argument("--author", help="author (config and history)")
    c.add_argument("--created-by", help="history created_by (default: overlayfs-py commit)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    _common(c)
    c.set_defaults(func=cmd_commit)

    _store_parsers(isub)
    from .registry.cmdline import add_parsers as registry_parsers
    registry_parsers(isub, _common)
    return parser


def _store_parsers(isub) -> None:
    """image list / rm / prune (the API is in ``inventory``)."""
    ls = isub.add_parser("list", aliases=["ls"], help="list stored images and layers",
                         description="Images recorded in the store (pulled, unpacked, "
                                     "mounted) and the unpacked layers, with their sizes.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--store", metavar="DIR", help="the store")
    ls.set_defaults(func=cmd_list)
    rm = isub.add_parser("rm", aliases=["rmi"], help="remove images from the store",
                         description="Forget the named images and remove the layers and "
                                     "blobs no other image uses (never a layer that a live "
                                     "mount uses).")
    rm.add_argument("names", nargs="+", metavar="NAME|DIGEST")
    rm.add_argument("--json", action="store_true", help="machine-readable output")
    rm.add_argument("--store", metavar="DIR", help="the store")
    rm.set_defaults(func=cmd_rm)
    pr = isub.add_parser("prune", help="remove layers and blobs that no image uses",
                         description="Remove every layer and blob that no stored image uses "
                                     "(never a layer that a live mount uses).")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--store", metavar="DIR", help="the store")
    pr.set_defaults(func=cmd_prune)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_list(args, mount) -> int:
    from . import inventory
    with api.open_store(args.store) as s:
        doc = inventory.listing(s)
    if args.json:
        _print_json(doc)
        return 0
    out = [f"{'IMAGE':<48} {'MANIFEST':<19} {'LAYERS':>6} {'SIZE':>10}"]
    for im in doc["images"]:
        mark = "" if im["complete"] else "  (layers missing)"
        out.append(f"{im['name']:<48} {im['manifest'][:19]:<19} {im['layers']:>6} "
                   f"{_size(im['size']):>10}{mark}")
    out.append("")
    out.append(f"{'LAYER':<19} {'FORMAT':<6} {'SIZE':>10} {'ENTRIES':>8} {'IMAGES':>6}  IN USE")
    for l in doc["layers"]:
        out.append(f"{l['diff_id'][:19]:<19} {l['format']:<6} {_size(l['size']):>10} "
                   f"{l['entries']:>8} {len(l['images']):>6}  {'yes' if l['in_use'] else 'no'}")
    out.append("")
    out.append(f"store {doc['store']}: {len(doc['images'])} images, {len(doc['layers'])} "
               f"layers, {doc['blobs']['count']} blobs ({_size(doc['blobs']['size'])})")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _print_removed(removed, as_json: bool) -> None:
    if as_json:
        _print_json(removed.to_json())
        return
    for name in removed.images:
        sys.stdout.write(f"removed image {name}\n")
    sys.stdout.write(f"removed {len(removed.layers)} layers and {len(removed.blobs)} blobs "
                     f"({_size(removed.freed)})\n")
    if removed.kept_in_use:
        sys.stdout.write(f"kept {len(removed.kept_in_use)} layers a live mount uses: "
                         f"{', '.join(d[:19] for d in removed.kept_in_use)}\n")


def cmd_rm(args, mount) -> int:
    from . import inventory
    _print_removed(inventory.remove_images(args.names, store=args.store), args.json)
    return 0


def cmd_prune(args, mount) -> int:
    from . import inventory
    _print_removed(inventory.prune(store=args.store), args.json)
    return 0


def cmd_unpack(args, mount) -> int:
    progress = make_progress(args.quiet)
    result = api.unpack(args.source, store=args.store, platform=args.platform,
                        oci_markers=args.oci_markers, progress=progress)
    warn(result.warnings)
    if args.json:
        _print_json(result.to_json())
    else:
        sys.stdout.write("lowerdir=" + ":".join(result.lowers()) + "\n")
    return 0


def _write_lines(lines) -> None:
    out = sys.stdout.buffer
    for line in lines:
        out.write(os.fsencode(line) + b"\n")
    out.flush()


def cmd_history(args, mount) -> int:
    from .history import human_size
    image, rows = api.history(args.source, store=args.store, platform=args.platform)
    if args.json:
        _print_json({"image": image.source, "manifest": image.manifest_digest,
                     "config": image.config_digest, "history": [r.to_json() for r in rows]})
        return 0

    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if args.no_trunc or len(text) <= n else text[:n - 3] + "..."

    table = [("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT")]
    for r in rows:
        layer = r.digest if args.no_trunc else (r.digest.split(":")[1][:12] if r.digest
                                                 else "<none>")
        if r.digest is None:
            layer = "<none>"
        created = (r.created or "").replace("T", " ").split(".")[0].rstrip("Z")
        table.append((layer, created, cut(r.created_by, 45), human_size(r.size),
                      cut(r.comment, 30)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    _write_lines("   ".join(col.ljust(w) for col, w in zip(row[:4], widths)) + "   " + row[4]
                 for row in table)
    return 0


def cmd_diff(args, mount) -> int:
    changes = api.diff(args.upper, lowers=args.lower, image=args.image, store=args.store,
                       platform=args.platform, content=args.content,
                       progress=make_progress(args.quiet))
    if args.json:
        _print_json([c.to_json() for c in changes])
    else:
        _write_lines(c.line() for c in changes)
    return 0


def cmd_commit(args, mount) -> int:
    result = api.commit(args.upper, args.to, from_image=args.from_image, store=args.store,
                        platform=args.platform, compression=args.compression,
                        created_by=args.created_by, comment=args.message, author=args.author,
                        progress=make_progress(args.quiet))
    warn(result.warnings)
    if args.json:
        _print_json(result.to_json())
        return 0
    from .history import human_size
    _write_lines([
        f"layer     {result.layer.digest} ({args.compression}, "
        f"{human_size(result.layer.size)}, {result.entries} entries)",
        f"diff_id   {result.diff_id}",
        f"config    {result.config.digest}",
        f"manifest  {result.manifest.digest}",
        f"image     {result.reference}",
    ])
    return 0


def cmd_mount(args, mount) -> int:
    if mount is None:
        raise UsageError("image mount is only available through the overlayfs-py command")
    if (args.upper is None) != (args.work is None):
        raise UsageError("--upper and --work go together")
    for o in args.options:
        if "lowerdir=" in o:
            raise UsageError("image mount takes its lower layers from the image; -o "
                             "lowerdir= is not allowed")
    if not os.path.isdir(args.mountpoint):
        raise ImageError(f"mountpoint {args.mountpoint}: not a directory")
    progress = make_progress(args.quiet)
    with api.prepare_mount(args.source, store=args.store, platform=args.platform,
                           oci_markers=args.oci_markers, progress=progress) as plan:
        warn(plan.unpacked.warnings)
        return mount(plan, args.mountpoint, args.upper, args.work, list(args.options),
                     args.foreground, args.debug)


def main(argv: Sequence[str], mount=None) -> int:
    """Run one image command; ``mount(plan, mountpoint, upper, work, options, foreground,
    debug) -> int`` mounts a MountPlan (given by overlayfs_py.cli)."""
    try:
        parser = build_parser()
        args = parser.parse_args(list(argv))
        return args.func(args, mount)
    except SystemExit as e:              # --help
        return int(e.code or 0)
    except UsageError as e:
        err(str(e))
        return 1
    except ImageError as e:
        err(str(e))
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        err(f"{where}{e.strerror or e}")
        return 1
    except Exception as e:                # a bug: one line, no traceback
        if os.environ.get("OVERLAYFS_PY_TRACEBACK"):
            raise
        err(f"internal error: {type(e).__name__}: {e}")
        return 1
