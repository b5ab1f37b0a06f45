"""``cxr synth`` / ``python -m pipelines.synth``: write the synthetic NIH and COVID datasets.

python -m pipelines.synth --profile demo [--nih DIR] [--covid DIR] [--overwrite] [--set data.synth.seed=1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.cli_args import add_config_args, config_from_args
from pipelines.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr synth",
        description="Write synthetic chest radiographs in the NIH ChestX-ray14 and COVID-19 Radiography layouts.",
    )
    add_config_args(parser)
    parser.add_argument("--nih", type=Path, default=None, help="NIH root (default: data.nih_dir)")
    parser.add_argument("--covid", type=Path, default=None, help="COVID root (default: data.covid_dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing synthetic folders")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    return parser


def format_summary(manifest: dict[str, Any], nih_dir: Path, covid_dir: Path, seconds: float) -> str:
    """A short table: images per finding and per class, where they went, and how long it took."""
    nih, covid = manifest["nih"], manifest["covid"]
    n = max(nih["images"], 1)
    lines = [
        f"NIH   {nih['images']} images of {nih['patients']} patients at {nih['image_size']} px "
        f"(test {nih['test_images']}, train_val {nih['train_val_images']}, {nih['archives']} archives) -> {nih_dir}",
    ]
    lines += [f"  {name:<20} {count:>6}  {100.0 * count / n:5.1f}%" for name, count in nih["findings"].items()]
    lines.append(f"COVID {covid['images']} images at {covid['image_size']} px -> {covid_dir}")
    m = max(covid["images"], 1)
    lines += [f"  {name:<20} {count:>6}  {100.0 * count / m:5.1f}%" for name, count in covid["classes"].items()]
    modes = ", ".join(
        f"{k} {v}" for k, v in {**nih["modes"], **{f"covid {k}": v for k, v in covid["modes"].items()}}.items()
    )
    lines.append(f"modes: {modes}")
    if manifest["duplicates"] or manifest["corrupt"]:
        lines.append(f"plants: {len(manifest['duplicates'])} near-duplicates, {len(manifest['corrupt'])} corrupt files")
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"cxr synth: {err}", file=sys.stderr)
        return 2
    from pipelines.synth import synthesize

    nih_dir = args.nih or cfg.data.nih_dir
    covid_dir = args.covid or cfg.data.covid_dir
    start = time.perf_counter()
    try:
        manifest = synthesize(cfg, nih_dir, covid_dir, overwrite=args.overwrite, workers=args.workers)
    except (FileExistsError, ValueError) as err:
        print(f"cxr synth: {err}", file=sys.stderr)
        return 1
    print(format_summary(manifest, Path(nih_dir), Path(covid_dir), time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
