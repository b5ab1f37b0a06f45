"""`cxr tune <stage>`: `train` sweeps the training hyperparameters, `ensemble` the fusion weight and gate."""

from __future__ import annotations

import importlib
import sys

SWEEPS: dict[str, str] = {
    "train": "tune.train_sweep",
    "ensemble": "tune.ensemble_sweep",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SWEEPS:
        print(f"usage: cxr tune {{{','.join(SWEEPS)}}} [options]   (`cxr tune train --help` for the options)")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return int(importlib.import_module(SWEEPS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
