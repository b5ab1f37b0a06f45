"""`cxr tune ensemble` (stage B): search the fusion weight and the gate threshold with Ray Tune.

The CNN's and the ViT's validation predictions are computed once (cached beside their checkpoints, every head of
their label spaces) and calibrated first: a temperature per model and head is fitted on them
(``models.calibration``), so the gate is tuned on the confidences evaluation and serving read. Each trial then
scores one (w_cnn, threshold) point (``tune.objective``: the weighted mean over heads of each head's main figure,
against the ViT fraction). The chosen point, the temperatures and the referral floor go to
``<train.run_dir>/ensemble.yaml``, which evaluation and serving read, with the out-of-distribution check fitted
beside them (``tune/ood_fit.py``) and a plot of quality against the fraction of images sent to the ViT; the chosen
point is then reported on the test split against CNN-only and always-ensemble.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from models.calibration import calibrate, fit_head_temperatures
from models.ensemble import confidence, refer_floor
from models.errors import CxrError
from models.labels import LabelSpace, by_head
from pipelines.artifacts import default_path, latest_checkpoint, latest_training, write_settings
from pipelines.cli import run_module
from pipelines.config import Config, EnsembleTuneConfig
from pipelines.evaluate.evaluation import gated
from pipelines.evaluate.metrics import head_calibration, main_key, scored_heads
from pipelines.runtime import ensure_ray
from pipelines.train import tracking
from tune.objective import evaluate_point, reference_points
from tune.ood_fit import fit_ood_check
from tune.plots import plot_tradeoff
from tune.predictions import split_predictions

log = logging.getLogger(__name__)
SEARCH_SPACE = {"w_cnn": (0.0, 1.0), "threshold": (0.5, 1.0)}
LEADING = ("objective", "quality", "vit_fraction", "feasible")  # the sweep table's first columns, then every head's


class HeadsMismatchError(CxrError, ValueError):
    """The CNN and the ViT were trained on other heads: their predictions cannot be fused."""


def _score_point(config: dict[str, float], cnn, vit, spaces, settings) -> dict[str, Any]:
    """One trial: the gated ensemble at the sampled point, on the cached validation predictions."""
    return evaluate_point(cnn, vit, config["w_cnn"], config["threshold"], spaces, settings)


def search(
    cnn: dict[str, np.ndarray],
    vit: dict[str, np.ndarray],
    spaces: Sequence[LabelSpace],
    settings: EnsembleTuneConfig,
    storage: Path,
    name: str = "tune-ensemble",
    seed: int = 0,
    start: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Run the sweep; one row per trial with w_cnn, threshold and the figures of ``evaluate_point`` (every head's
    headline figures, quality, vit_fraction, feasible, objective)."""
    spaces = tuple(spaces)
    trainable = tune.with_parameters(_score_point, cnn=cnn, vit=vit, spaces=spaces, settings=settings)
    space = {key: tune.uniform(low, high) for key, (low, high) in SEARCH_SPACE.items()}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            num_samples=settings.num_samples,
            # the configured point is always tried, so the sweep can only improve on it
            search_alg=BasicVariantGenerator(points_to_evaluate=[start] if start else None, random_state=seed),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve()), verbose=0),
    )
    # verbose=0 still prints the new output's "Configuration for experiment" box; the legacy reporter stays silent
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    frame = tuner.fit().get_dataframe()
    frame = frame.rename(columns={f"config/{key}": key for key in SEARCH_SPACE})
    figures = [k for k in evaluate_point(cnn, vit, 1.0, 0.0, spaces, settings) if k not in LEADING]
    return frame[["w_cnn", "threshold", *LEADING, *figures]].reset_index(drop=True)


def choose(frame: pd.DataFrame) -> pd.Series:
    """Best objective; among equals, the fewest ViT calls, then the weight nearest an even split."""
    ranked = frame.assign(_balance=(frame["w_cnn"] - 0.5).abs())
    ranked = ranked.sort_values(["objective", "vit_fraction", "_balance"], ascending=[False, True, True])
    return ranked.iloc[0].drop("_balance")


def _role_record(role: str, checkpoint: Path, cfg: Config) -> dict[str, Any]:
    record: dict[str, Any] = {"checkpoint": str(checkpoint)}
    try:
        summary = latest_training(cfg, role)
    except FileNotFoundError:
        return record
    if Path(summary["best_checkpoint"]) == checkpoint:
        record.update({k: summary[k] for k in ("registered_model", "mlflow_run_id") if k in summary})
    return record


def fit_calibration(
    val: dict[str, dict[str, np.ndarray]], spaces: Sequence[LabelSpace]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """Each role's temperature per head on the validation split, and its ECE there before and after."""
    temperatures = {role: fit_head_temperatures(pred, spaces) for role, pred in val.items()}
    ece = {}
    for role, pred in val.items():
        after = calibrate(pred, spaces, temperatures[role])
        ece[role] = {
            space.head: {
                "temperature": round(temperatures[role][space.head], 4),
                "ece_before": round(head_calibration(space, pred, index)["ece"], 4),
                "ece_after": round(head_calibration(space, after, index)["ece"], 4),
            }
            for index, space in enumerate(spaces)
        }
    return temperatures, ece


def referral_floor(
    val: dict[str, dict[str, np.ndarray]], spaces: Sequence[LabelSpace], w_cnn: float, threshold: float, coverage: float
) -> float:
    """The gated ensemble's confidence (each image on its own head) below which ``1 - coverage`` of the validation
    images fall: answers less confident than this are referred."""
    final, _ = gated(val["cnn"], val["vit"], spaces, w_cnn, threshold)
    heads = {space.head: final[space.head] for space in spaces}
    return refer_floor(confidence(heads, by_head(spaces), scored_heads(final, spaces)), coverage)


def tune_ensemble(cfg: Config, cnn_dir: Path, vit_dir: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    settings = cfg.tune.ensemble
    raw_val, spaces = _both(cfg, cnn_dir, vit_dir, "val")
    # the gate reads calibrated confidences: temperatures first (on validation), then the search on their output
    temperatures, calibration = fit_calibration(raw_val, spaces) if settings.calibrate else ({}, {})
    val = {role: calibrate(pred, spaces, temperatures.get(role, {})) for role, pred in raw_val.items()}
    ensure_ray(cfg)
    start = {"w_cnn": cfg.ensemble.w_cnn, "threshold": min(max(cfg.ensemble.threshold, 0.5), 1.0)}
    frame = search(val["cnn"], val["vit"], spaces, settings, out.parent / "tune", seed=seed, start=start)
    best = choose(frame)
    w_cnn, threshold = float(best["w_cnn"]), float(best["threshold"])
    if not best["feasible"]:
        log.warning("no point met vit_fraction <= %.2f; writing the least infeasible", settings.max_vit_fraction)
    raw_test, _ = _both(cfg, cnn_dir, vit_dir, "test")
    test = {role: calibrate(pred, spaces, temperatures.get(role, {})) for role, pred in raw_test.items()}
    refer_below = referral_floor(val, spaces, w_cnn, threshold, settings.refer_coverage)
    ood = fit_ood_check(cfg, out.parent)  # the refusal check, kept beside the gate it was tuned with
    figures = {
        split: reference_points(preds["cnn"], preds["vit"], w_cnn, threshold, spaces, settings)
        for split, preds in (("validation", val), ("test", test))
    }
    plot = plot_tradeoff(frame, best, figures["validation"], settings, out.with_name("ensemble_tradeoff.png"), spaces)
    write_settings(
        out,
        w_cnn,
        threshold,
        tuned_for={"cnn": _role_record("cnn", cnn_dir, cfg), "vit": _role_record("vit", vit_dir, cfg)},
        temperatures={role: {head: round(t, 6) for head, t in heads.items()} for role, heads in temperatures.items()},
        calibration=calibration,
        refer_below=round(refer_below, 6),
        refer_coverage=settings.refer_coverage,
        ood=ood,
        objective=settings.model_dump(mode="json"),
        trials=len(frame),
        validation=_plain(figures["validation"]),
        test=_plain(figures["test"]),
        plot=str(plot),
    )
    run_id = _log_to_mlflow(cfg, out, plot, w_cnn, threshold, figures)
    return {
        "w_cnn": w_cnn,
        "threshold": threshold,
        "calibration": calibration,
        "refer_below": refer_below,
        "ood": ood,
        "figures": figures,
        "spaces": spaces,
        "path": out,
        "plot": plot,
        "run_id": run_id,
    }


def _both(
    cfg: Config, cnn_dir: Path, vit_dir: Path, split: str
) -> tuple[dict[str, dict[str, np.ndarray]], tuple[LabelSpace, ...]]:
    """Both models' cached predictions on ``split`` and their (shared) label spaces."""
    (cnn, spaces), (vit, vit_spaces) = (split_predictions(cfg, path, split) for path in (cnn_dir, vit_dir))
    if vit_spaces != spaces:
        raise HeadsMismatchError(
            f"{vit_dir}: heads {[s.head for s in vit_spaces]} (or their classes) differ from the CNN's "
            f"{[s.head for s in spaces]} in {cnn_dir}; train both on the same shards"
        )
    return {"cnn": cnn, "vit": vit}, spaces


def _plain(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {k: (bool(v) if isinstance(v, bool | np.bool_) else round(float(v), 6)) for k, v in point.items()}
        for name, point in points.items()
    }


def _log_to_mlflow(cfg: Config, out: Path, plot: Path, w_cnn: float, threshold: float, figures) -> str:
    experiment = tracking.ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=experiment, run_name="tune-ensemble", tags={"stage": "tune-ensemble"}) as run:
        mlflow.log_params({"w_cnn": w_cnn, "threshold": threshold, **cfg.tune.ensemble.model_dump(mode="json")})
        for split, points in figures.items():
            for name, point in points.items():
                values = {f"{split}_{name}_{k}": float(v) for k, v in point.items() if not isinstance(v, bool)}
                mlflow.log_metrics({k: v for k, v in values.items() if not math.isnan(v)})
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(plot))
        return run.info.run_id


def format_table(points: dict[str, dict[str, Any]], spaces: Sequence[LabelSpace]) -> str:
    """quality, each head's main figure and the ViT fraction, a row per point."""
    titles = {main_key(s): f"{s.head} {'AUROC' if s.multi_label else 'F1'}" for s in spaces}
    heads = "".join(f" {t:>{len(t) + 1}}" for t in titles.values())
    header = f"{'':18} {'quality':>8}{heads} {'ViT fraction':>13}"
    rows = [header]
    for name, p in points.items():
        cells = "".join(f" {p[key]:>{len(t) + 1}.3f}" for key, t in titles.items())
        rows.append(f"{name:18} {p['quality']:8.3f}{cells} {p['vit_fraction']:13.1%}")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cnn", type=Path, help="CNN checkpoint directory (default: the last `cxr train` run)")
    parser.add_argument("--vit", type=Path, help="ViT checkpoint directory (default: the last `cxr train` run)")
    parser.add_argument("--out", type=Path, help="where to write ensemble.yaml (default: <train.run_dir>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")


def run(args: argparse.Namespace, cfg: Config) -> int:
    cfg = cfg.with_absolute_paths()
    cnn = args.cnn or latest_checkpoint(cfg, "cnn")
    vit = args.vit or latest_checkpoint(cfg, "vit")
    result = tune_ensemble(cfg, cnn, vit, (args.out or default_path(cfg)).resolve(), args.seed)
    settings = cfg.tune.ensemble
    rule = (
        f"quality with ViT fraction <= {settings.max_vit_fraction:.0%}"
        if settings.objective == "constrained"
        else f"quality - {settings.vit_cost} x ViT fraction"
    )
    print(f"chosen: w_cnn {result['w_cnn']:.3f}, threshold {result['threshold']:.3f}  (objective: {rule})")
    for split in ("validation", "test"):
        print(f"\n{split} split\n{format_table(result['figures'][split], result['spaces'])}")
    print(f"\nanswers below confidence {result['refer_below']:.3f} say refer "
          f"(refer_below; {settings.refer_coverage:.0%} of validation images answered)")  # fmt: skip
    ood = result["ood"]
    print(
        f"out-of-distribution check: score above {ood['threshold']:.3f} is refused "
        f"({ood['validation_refused']:.1%} of {ood['validation_images']} validation images; {ood['detector']})"
    )
    print("\ntemperature scaling on the validation split (ECE before -> after):")
    for role, heads in result["calibration"].items():
        cells = [f"{h} T={c['temperature']:.2f} {c['ece_before']:.3f} -> {c['ece_after']:.3f}"
                 for h, c in heads.items()]  # fmt: skip
        print(f"  {role}: " + ", ".join(cells))
    print(f"\nwritten: {result['path']}\nplot: {result['plot']}\nMLflow run: {result['run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr tune ensemble`; also `python -m tune.ensemble_sweep` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
