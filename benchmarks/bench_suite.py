"""The compiled executor against torch's RMSNorm kernels: the issue-6 table and plot.

    python benchmarks/bench_suite.py [--quick] [--rounds 7] [--out bench-results]
    taskgraph-norm bench [same options]            # the same suite, installed

Every ratio compares methods timed in the same process, interleaved round by
round, median over rounds (see taskgraph_norm/tools/bench.py).  Writes bench.md and
bench.png (matplotlib: pip install 'taskgraph-norm[bench]') into --out.
"""

from __future__ import annotations

import sys

from taskgraph_norm.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
