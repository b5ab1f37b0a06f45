"""`cxr bench train`: training images/s per worker for the CNN and the ViT, 1 worker vs 2 workers, measured
through the real training path (Ray Train DDP fed by Ray Data) in one run.

Each configuration trains ``--epochs`` epochs in a scratch run directory; the figure is the mean of the
epochs after the first (which pays for start-up and warm-up).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.cli import run_module
from pipelines.config import Config, config_from_dict
from pipelines.runtime import ensure_ray
from pipelines.train.driver import build_trainer


def measure(cfg: Config, role: str, workers: int, epochs: int, scratch: Path) -> float:
    """Mean images/s per worker over the epochs after the first."""
    tree = cfg.model_dump(mode="json")
    tree["train"].update(
        {"num_workers": workers, "epochs": epochs, "run_dir": str(scratch), "early_stopping_patience": epochs + 1}
    )
    tree["mlflow"]["tracking_uri"] = f"sqlite:///{scratch / 'mlflow.db'}"
    run = build_trainer(config_from_dict(tree), role, f"bench-{role}-{workers}").fit()
    rates = [
        m["images_per_s_per_worker"]
        for m in (run.metrics_dataframe.to_dict("records") if run.metrics_dataframe is not None else [])
    ][1:]
    return sum(rates) / len(rates) if rates else run.metrics["images_per_s_per_worker"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="cnn,vit")


def run(args: argparse.Namespace, cfg: Config) -> int:
    ensure_ray(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for role in args.models.split(","):
            one = measure(cfg, role, 1, args.epochs, Path(scratch) / f"{role}-1")
            two = measure(cfg, role, 2, args.epochs, Path(scratch) / f"{role}-2")
            rows.append((role, getattr(cfg.model, role).name, one, two))
    print(
        f"input {cfg.model.input_size} px, batch {cfg.train.batch_size}/worker, "
        f"{args.epochs} epochs per configuration (first excluded)"
    )
    print(f"{'model':<22}{'1 worker img/s':>16}{'2 workers img/s/worker':>24}{'2 workers total':>17}{'scaling':>9}")
    for role, name, one, two in rows:
        print(f"{role + ' ' + name:<22}{one:>16.0f}{two:>24.0f}{2 * two:>17.0f}{2 * two / one:>8.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench train`; also `python -m pipelines.bench.train` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
