"""Unit tests of the pure layer logic: merge rules, whiteout decoding, opaque cut, inode numbers.

No mount: these run on tmp_path trees and on plain data.
"""
import os
import stat


from overlayfs_py import dirindex, whiteout
from overlayfs_py.inodes import InodeTable, Node, derived_ino
from overlayfs_py.lookup import DIR, NONDIR, WHITEOUT, cut_at_opaque, merge_listings, needs_whiteout


def test_upper_hides_lower_and_remembers_lower_positive():
    idx = merge_listings([(0, [(b"a", NONDIR)]), (1, [(b"a", NONDIR), (b"b", NONDIR)])])
    assert idx[b"a"] == ((0, False), (1, False))
    assert idx[b"b"] == ((1, False),)
    assert needs_whiteout(idx[b"a"], 0)          # removing a must hide the lower a
    assert not needs_whiteout(((0, False),), 0)


def test_whiteout_hides_name_below_only():
    idx = merge_listings([(0, [(b"a", WHITEOUT)]), (1, [(b"a", NONDIR)]), (2, [(b"a", DIR)])])
    assert b"a" not in idx


def test_oci_whiteout_in_same_layer_does_not_hide_that_layer():
    # layer 1 has both X and .wh.X: X is shown from layer 1, the X of layer 2 is hidden
    idx = merge_listings([(1, [(b"x", NONDIR), (b"x", WHITEOUT)]), (2, [(b"x", NONDIR)])])
    assert idx[b"x"] == ((1, False),)


def test_dirs_merge_until_non_dir_or_whiteout():
    idx = merge_listings([(0, [(b"d", DIR)]), (1, [(b"d", DIR)]), (2, [(b"d", NONDIR)]),
                          (3, [(b"d", DIR)])])
    assert idx[b"d"] == ((0, True), (1, True), (2, False))
    assert cut_at_opaque(idx[b"d"], lambda layer: False) == (0, 1)
    idx = merge_listings([(0, [(b"d", DIR)]), (1, [(b"d", WHITEOUT)]), (2, [(b"d", DIR)])])
    assert idx[b"d"] == ((0, True),)


def test_non_dir_top_hides_dirs_below():
    idx = merge_listings([(0, [(b"d", NONDIR)]), (1, [(b"d", DIR)]), (2, [(b"d", DIR)])])
    assert idx[b"d"] == ((0, False), (1, True))


def test_opaque_cuts_the_merge():
    occ = ((0, True), (1, True), (2, True))
    assert cut_at_opaque(occ, lambda layer: layer == 1) == (0, 1)
    assert cut_at_opaque(occ, lambda layer: layer == 0) == (0,)


def test_scan_decodes_every_whiteout_format(tmp_path):
    d = tmp_path / "layer"
    d.mkdir()
    (d / "file").write_text("x")
    (d / "sub").mkdir()
    os.mknod(d / "kwh", stat.S_IFCHR | 0o600, 0)
    os.mkfifo(d / "fifo")
    (d / ".wh.gone").write_text("")
    (d / ".wh..wh..opq").write_text("")
    (d / ".wh..wh.plnk").mkdir()
    os.symlink("/", d / "etc")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = dict(dirindex.scan_layer_dir(fd))
        assert whiteout.dir_is_opaque(fd)
    finally:
        os.close(fd)
    assert got == {b"file": NONDIR, b"sub": DIR, b"kwh": WHITEOUT, b"fifo": NONDIR,
                   b"gone": WHITEOUT, b"etc": NONDIR}


def test_opaque_xattr_formats(tmp_path):
    for name, value, expect in (("trusted.overlay.opaque", b"y", True),
                                ("user.overlay.opaque", b"y", True),
                                ("trusted.overlay.opaque", b"x", False),
                                ("user.fuseoverlayfs.opaque", b"y", True)):
        d = tmp_path / f"{name}-{value.decode()}"
        d.mkdir()
        os.setxattr(d, name, value)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert whiteout.dir_is_opaque(fd) is expect, name
        finally:
            os.close(fd)


def test_marker_names():
    assert whiteout.oci_whiteout_target(b".wh.foo") == b"foo"
    assert whiteout.oci_whiteout_target(b".wh..wh..opq") is None
    assert whiteout.oci_whiteout_target(b".wh.") is None
    assert whiteout.oci_whiteout_target(b"foo") is None
    assert whiteout.is_private_xattr("trusted.overlay.origin")
    assert not whiteout.is_private_xattr("user.mime_type")


def test_inode_numbers_unique_per_layer_and_never_reused_while_live():
    assert derived_ino(0, 5) != derived_ino(1, 5)
    root = Node(1, None, b"", True, (0,), None)
    table = InodeTable(root)
    a = table.add(Node(table.new_ino((0, 1, 5)), root, b"a", False, (0,), (0, 1, 5)))
    assert a.ino == derived_ino(0, 5)
    table.drop_key(a)              # a was unlinked but the kernel still holds it
    b_ino = table.new_ino((0, 1, 5))
    assert b_ino != a.ino
    assert table.forget(a.ino, 0) is a
    assert table.new_ino((0, 1, 5)) == a.ino


def test_inode_table_keys_packed_taken_over_dropped_and_rekeyed():
    root = Node(1, None, b"", True, (0,), None)
    table = InodeTable(root)
    k = (1, 7, 42)
    a = table.add(Node(table.new_ino(k), root, b"a", False, (1,), k))
    assert table.find(k) is a and table.by_key == {}        # numbered after its key
    # the same object again as another node (a type change behind our back): the newer one
    # is found by the key; the older keeps its number but no key
    b = table.add(Node(table.new_ino(k), root, b"a", True, (1,), k))
    assert b.ino != a.ino and table.find(k) is b and a.key is None
    assert table.find((1, 8, 42)) is None                    # another device, same st_ino
    # copy-up: b is backed by an upper object now and keeps its number
    table.rekey(b, (0, 7, 99))
    assert table.find(k) is None and table.find((0, 7, 99)) is b
    table.drop_key(b)
    assert table.find((0, 7, 99)) is None and table.get(b.ino) is b
    assert table.forget(a.ino, 0) is a and table.get(a.ino) is None
