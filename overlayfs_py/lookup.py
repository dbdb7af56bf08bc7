"""Resolve names across the layer stack: pure logic, no syscalls, no pyfuse3.

A directory's *merged index* maps each visible name to its occurrences, top layer first:
``((layer, is_dir), ...)``. The rules (kernel Documentation/filesystems/overlayfs.rst):
- the topmost layer that has the name decides what it is;
- a whiteout in a layer hides the name in every layer below it;
- a non-directory ends the search (it hides everything below, and it ends a merge of dirs above);
- directories merge with the directories of the same name below them, down to the first opaque one
  (opaqueness is a property of each directory, so it is applied by ``cut_at_opaque``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Sequence, Tuple

DIR = "d"
NONDIR = "f"
WHITEOUT = "w"

Occurrences = Tuple[Tuple[int, bool], ...]
Index = Dict[bytes, Occurrences]


def merge_listings(listings: Iterable[Tuple[int, Iterable[Tuple[bytes, str]]]]) -> Index:
    """Merge per-layer listings, given top layer first.

    Each listing is ``(layer, [(name, kind), ...])`` with kind DIR, NONDIR or WHITEOUT; a
    whiteout entry (char 0/0 ``X`` or ``.wh.X``) is reported as ``(X, WHITEOUT)``. Within one
    layer, real entries are applied before whiteouts: an OCI ``.wh.X`` only hides X *below*.

    Occurrences list the run of merged directories, and after a non-directory (at the top, or
    ending a run of directories) the first positive entry below it, if no whiteout comes first:
    that one tells whether removing the name needs a whiteout (the kernel's ovl_lower_positive).
    """
    found: Dict[bytes, List[Tuple[int, bool]]] = {}
    state: Dict[bytes, int] = {}         # _OPEN: merging dirs; _PROBE: one more; _DONE
    for layer, entries in listings:
        whiteouts = []
        for name, kind in entries:
            if kind == WHITEOUT:
                whiteouts.append(name)
                continue
            st = state.get(name)
            is_dir = kind == DIR
            if st is None:
                found[name] = [(layer, is_dir)]
                state[name] = _OPEN if is_dir else _PROBE
            elif st == _OPEN:
                found[name].append((layer, is_dir))
                if not is_dir:
                    state[name] = _DONE
            elif st == _PROBE:
                found[name].append((layer, is_dir))
                state[name] = _DONE
        for name in whiteouts:
            state[name] = _DONE
    single = _SINGLE
    return {name: single.get(occ[0]) or _single(occ[0]) if len(occ) == 1 else tuple(occ)
            for name, occ in found.items()}


_OPEN, _PROBE, _DONE = 0, 1, 2

# Most names occur in one layer: their occurrences are one of a few tuples, ((layer, is_dir),),
# shared by every such name instead of two tuples per name (~80 bytes of a 50k-name tree's
# ~1 KiB per name). Occurrences are immutable; an index entry is replaced, never changed.
_SINGLE: Dict[Tuple[int, bool], Occurrences] = {}


def _single(one: Tuple[int, bool]) -> Occurrences:
    return _SINGLE.setdefault(one, (one,))


def cut_at_opaque(occ: Sequence[Tuple[int, bool]], is_opaque: Callable[[int], bool]
                  ) -> Tuple[int, ...]:
    """Layers of a directory, top first, stopping after the first opaque one."""
    layers = []
    for layer, is_dir in occ:
        if not is_dir:
            break
        layers.append(layer)
        if is_opaque(layer):
            break
    return tuple(layers)


def needs_whiteout(occ: Sequence[Tuple[int, bool]], upper: int) -> bool:
    """Removing this name must leave a whiteout iff some lower layer still shows it."""
    return any(layer != upper for layer, _ in occ)
