"""``python -m benchmarks NAME [options]``: run a benchmark, then render BENCHMARKS.md.

NAME is one of the modules in ``benchmarks.report.BENCHMARKS``, ``all`` (each in
turn, with the same options) or ``report`` (render only).
"""

from __future__ import annotations

import importlib
import sys

from benchmarks.report import BENCHMARKS


def main(argv: list[str]) -> int:
    """Run the named benchmark(s) and print their figures."""
    valid = (*BENCHMARKS, "all", "report")
    if not argv or argv[0] not in valid:
        sys.stderr.write(f"usage: python -m benchmarks {{{','.join(valid)}}} ...\n")
        return 2
    name, options = argv[0], argv[1:]
    if name == "all":
        # The GPU benchmark needs a GPU: run it by name on one.
        names = [n for n in BENCHMARKS if n != "gpu"]
    else:
        names = [] if name == "report" else [name]
    for each in names:
        module = importlib.import_module(f"benchmarks.{each}")
        # Benchmarks that take no data (write_throughput) get no options.
        takes_data = getattr(module, "TAKES_DATA", True)
        print(module.main(list(options) if takes_data or name != "all" else []))
    print(importlib.import_module("benchmarks.report").main([]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
