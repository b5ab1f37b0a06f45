"""``cxr synth`` / ``python -m pipelines.data.synth``: write the synthetic NIH, COVID and pneumonia datasets.

python -m pipelines.data.synth --profile demo [--nih DIR] [--covid DIR] [--pneumonia DIR] [--overwrite]
    [--set data.synth.seed=1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.cli import run_module
from pipelines.config import Config


def _pneumonia_lines(pneumonia: dict[str, Any] | None, folder: Path | None) -> list[str]:
    if not pneumonia:
        return []
    low, high = pneumonia["image_size"]
    lines = [f"PNEUMONIA {pneumonia['images']} images of {pneumonia['patients']} patients, {low}-{high} px -> {folder}"]
    for split, classes in pneumonia["splits"].items():
        lines.append(f"  {split:<6} " + "  ".join(f"{cls} {count:>5}" for cls, count in classes.items()))
    lines.append("  modes: " + ", ".join(f"{k} {v}" for k, v in pneumonia["modes"].items()))
    return lines


def format_summary(
    manifest: dict[str, Any], nih_dir: Path, covid_dir: Path, seconds: float, pneumonia_dir: Path | None = None
) -> str:
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
    lines += _pneumonia_lines(manifest.get("pneumonia"), pneumonia_dir)
    if manifest.get("synth", {}).get("source_marker"):
        lines.append("source markers: every image carries its source's site tag (a planted shortcut)")
    if manifest["duplicates"] or manifest["corrupt"]:
        lines.append(f"plants: {len(manifest['duplicates'])} near-duplicates, {len(manifest['corrupt'])} corrupt files")
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nih", type=Path, default=None, help="NIH root (default: data.nih_dir)")
    parser.add_argument("--covid", type=Path, default=None, help="COVID root (default: data.covid_dir)")
    parser.add_argument(
        "--pneumonia",
        type=Path,
        default=None,
        help="pneumonia root, holds chest_xray/ (default: data.pneumonia_dir; when null, beside the NIH root)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing synthetic folders")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pipelines.data.synth import synthesize, target_dirs

    nih_dir, covid_dir, pneumonia_dir = target_dirs(cfg, args.nih, args.covid, args.pneumonia)
    start = time.perf_counter()
    manifest = synthesize(
        cfg, nih_dir, covid_dir, overwrite=args.overwrite, workers=args.workers, pneumonia_dir=pneumonia_dir
    )
    print(format_summary(manifest, nih_dir, covid_dir, time.perf_counter() - start, pneumonia_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr synth`; also `python -m pipelines.data.synth` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
