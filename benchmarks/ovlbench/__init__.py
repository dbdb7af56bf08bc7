"""The benchmark harness of overlayfs-py (run it as benchmarks/bench.py).

  common     units, logging, cache drops, Metric (a row) and value formats
  fixtures   Sizes (full/quick) and the deterministic fixture trees
  targets    plain, kernel, fuse-overlayfs, overlayfs-py: mounting and unmounting
  workloads/ one module per workload, each a @workload function
  runner     Bench: the interleaved run loop and what workloads call (view, timed_cmd, ...)
  report     medians, paired ratios, the table, RESULTS.md sections
  cli        arguments and main()
"""
