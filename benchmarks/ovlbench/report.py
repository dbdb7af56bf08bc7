"""The report: medians and paired ratios per cell, the markdown table, consistency and
spread notes, machine details, and the sections of benchmarks/RESULTS.md."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
from typing import Dict, List

from .common import DROP_RETRIES, REPO, fmt_ratio, fmt_value, human_bytes, kfmt


def summary(b) -> dict:
    """Per row and target: values, median, errors, n/a reason, paired ratios."""
    cols = [t.name for t in b.targets]
    rows = {}
    for name, m in b.metrics.items():
        row = {}
        for c in cols:
            vals = b.values.get(name, {}).get(c, [])
            errs = b.errors.get(name, {}).get(c, [])
            na = b.na.get(name, {}).get(c)
            cell = {"values": vals}
            if vals:
                cell["median"] = statistics.median(vals)
            if errs:
                cell["errors"] = errs
            if na:
                cell["na"] = na
            if (name, c) in b.tainted:
                cell["tainted"] = True
            row[c] = cell
        for c in cols:
            if c != "plain" and "median" in row[c]:
                r = b.paired(name, c, name, "plain", m.higher_better)
                if r is not None:
                    row[c]["vs_plain"] = r
        if m.vs_1layer is not None:
            base = m.vs_1layer
            for c in cols:
                if c == "plain":
                    continue          # plain stats the bottom layer alone at every depth
                if "median" in row[c]:
                    r = b.paired(name, c, base, c, False)
                    if r is not None:
                        row[c]["vs_1layer"] = r
        rows[name] = {"unit": m.unit, "higher_is_better": m.higher_better, "cells": row}
    return rows

def consistency_notes(b) -> List[str]:
    notes = []
    for what, per in sorted(b.checks.items()):
        if what == "du -s: total KiB":
            continue            # block accounting may legitimately differ by a few KiB
        seen = {tn: sorted(v, key=str) for tn, v in per.items()}
        distinct = {str(v) for vs in seen.values() for v in vs}
        if len(distinct) > 1:
            notes.append(f"MISMATCH {what}: " + "; ".join(f"{k}={v}" for k, v in seen.items()))
    return notes


def spread_notes(rows: dict) -> List[str]:
    """Cells whose repetitions disagree wildly: the median hides an outlier worth knowing."""
    notes = []
    for name, row in rows.items():
        for target, cell in row["cells"].items():
            vals = cell.get("values") or []
            if len(vals) >= 2 and min(vals) > 0 and max(vals) / min(vals) > 5 and \
                    (row["unit"] != "s" or max(vals) - min(vals) > 0.05):
                shown = ", ".join(fmt_value(v, row["unit"]) for v in vals)
                notes.append(f"wide spread in '{name}' for {target}: {shown} (median shown)")
    return notes


def render_table(rows: dict, cols: List[str]) -> str:
    foot: List[str] = []

    def footnote(text: str) -> str:
        text = " ".join(text.split())
        if len(text) > 300:
            text = text[:300] + "…"
        if text not in foot:
            foot.append(text)
        return f"n/a[{foot.index(text) + 1}]"

    lines = ["| workload | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            cell = row["cells"][c]
            if "median" in cell:
                s = fmt_value(cell["median"], row["unit"])
                extra = []
                if cell.get("vs_plain") is not None:
                    extra.append(fmt_ratio(cell["vs_plain"]))
                if cell.get("vs_1layer") is not None:
                    extra.append(f"{fmt_ratio(cell['vs_1layer'])} 1L")
                if extra:
                    s += " (" + ", ".join(extra) + ")"
                if cell.get("tainted"):
                    s += " †"
                nerr = len(cell.get("errors", []))
                if nerr:
                    s += f" [{len(cell['values'])}/{len(cell['values']) + nerr} ok: " \
                         f"{footnote(cell['errors'][0])[3:]}]"
                cells.append(s)
            elif cell.get("na"):
                cells.append(footnote(cell["na"]))
            elif cell.get("errors"):
                cells.append(footnote("failed: " + cell["errors"][0]))
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if any(c.get("tainted") for row in rows.values() for c in row["cells"].values()):
        foot_t = ("† another process wrote to /proc/sys/vm/drop_caches during this cell in "
                  f"every one of {DROP_RETRIES + 1} attempts of at least one repetition; "
                  "its warm figures may be partly cold")
        out += "\n\n" + foot_t
    if foot:
        out += "\n\n" + "\n".join(f"[{i + 1}] {f}" for i, f in enumerate(foot))
    return out


def machine_info(cache: str) -> dict:
    def cmd(*a):
        try:
            return subprocess.run(a, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    fstype = " ".join(cmd("findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", cache).split())
    ovl = {}
    pdir = "/sys/module/overlay/parameters"
    if os.path.isdir(pdir):
        for p in sorted(os.listdir(pdir)):
            with contextlib.suppress(OSError), open(os.path.join(pdir, p)) as f:
                ovl[p] = f.read().strip()
    return {
        "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
        "cache_fs": fstype, "python": platform.python_version(),
        "fuse_overlayfs": [ln for ln in cmd("fuse-overlayfs", "--version").splitlines()
                           if ln.startswith("fuse-overlayfs")][:1],
        "overlay_params": ovl,
        "repo_commit": cmd("git", "-C", REPO, "rev-parse", "--short", "HEAD"),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def render_section(mode: str, meta: dict, table: str, notes: List[str]) -> str:
    mi = meta["machine"]
    s = meta["sizes"]
    fo = (mi.get("fuse_overlayfs") or ["?"])[0]
    lines = [
        f"## {'Quick' if mode == 'quick' else 'Full'} run — {meta['date']}",
        "",
        (f"**QUICK MODE: small fixtures ({kfmt(s['tree_files'])} files, "
         f"{human_bytes(s['big_bytes'])} file, stacks {'/'.join(map(str, s['depths']))}, "
         f"{kfmt(s['stat_paths'])} stats). Not comparable with full-mode figures.**\n"
         if mode == "quick" else
         f"Full fixtures: {kfmt(s['tree_files'])} files in {kfmt(s['tree_dirs'])} dirs + "
         f"{human_bytes(s['big_bytes'])} file, stacks {'/'.join(map(str, s['depths']))}, "
         f"{kfmt(s['stat_paths'])} stats.\n"),
        f"- machine: {mi['cpus']}× {mi['cpu']}, {mi['memory']} RAM, kernel {mi['kernel']}, "
        f"layers on {mi['cache_fs']}",
        f"- {fo}; overlay module params: " +
        ", ".join(f"{k}={v}" for k, v in mi["overlay_params"].items()),
        f"- python {mi['python']}, repo at {mi['repo_commit']}, overlayfs-py command: "
        f"`{meta['ours_cmd']}`",
        f"- {meta['reps']} repetitions per cell, targets interleaved; the value is the median; "
        f"(R×) = median over repetitions of (target ÷ plain) in the same repetition, i.e. times "
        f"slower than plain (rates: plain ÷ target); `1L` = the same for this target's 1-layer "
        f"stat time",
        f"- wall time {meta['wall_seconds'] / 60:.1f} min, of which fixture build "
        f"{meta['fixture_build_seconds']:.0f} s (the fixtures took "
        f"{sum(v.get('build_seconds', 0) for v in meta['fixtures'].values()):.0f} s when first "
        f"built, then are reused) and host-cache priming {meta.get('prime_seconds', 0):.0f} s; "
        f"load average at start "
        f"{' '.join(mi['loadavg'])}, at end {' '.join(meta.get('loadavg_end', []))} "
        f"(2 vCPUs, shared with other work: see README)",
        f"- raw data: `benchmarks/results/{meta['json_name']}`",
        "",
        table,
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


RESULTS_HEADER = """# Benchmark results

Produced by `benchmarks/bench.py --write-results` (`make bench` / `make bench-quick`);
see `benchmarks/README.md` for what each workload does and how to read the ratios.
Each section is replaced by the next run of the same mode; the hand-written observations
section is kept (check the run it refers to). The raw data of every run cited here is in
`benchmarks/results/`, named by the run's start time (`results-YYYYMMDD-HHMMSS-MODE.json`).
"""


def update_results_md(path: str, mode: str, section: str) -> None:
    blocks: Dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"<!-- BEGIN (\w+) -->\n(.*?)<!-- END \1 -->", text, re.S):
            blocks[m.group(1)] = m.group(2)
    blocks[mode] = section
    fixed = ("full", "observations", "quick")     # observations: hand-written, kept as is
    order = [m for m in fixed if m in blocks] + [m for m in blocks if m not in fixed]
    out = RESULTS_HEADER + "".join(f"\n<!-- BEGIN {m} -->\n{blocks[m]}<!-- END {m} -->\n"
                                   for m in order)
    with open(path, "w") as f:
        f.write(out)
