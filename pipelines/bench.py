"""`cxr bench <what>`: the project's benchmarks, each printing figures measured side by side in one run."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "data": "pipelines.bench_data",
    "train": "pipelines.bench_train",
    "serve": "pipelines.bench_serve",
    "export": "pipelines.bench_export",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: cxr bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
