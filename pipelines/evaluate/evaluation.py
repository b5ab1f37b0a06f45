"""`cxr evaluate`: the CNN, the ViT, the always-fused and the gated ensemble side by side on the test split, with a
row per extra checkpoint: the last linear probe of each role (``latest-<role>-probe.json``) or ``--probe DIR``, a
sanity baseline labelled by its role and recipe (``cnn linear probe``).

Writes ``report.md``, ``metrics.json`` and PNG plots (ROC curves, reliability diagrams, confusion matrices, a
grid of Grad-CAM overlays per class) and logs them to MLflow. Predictions come from ``inference.py``: in this
process for small splits, as Ray Data batch inference for large ones, row for row the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from models.checkpoint import load_checkpoint, model_from_checkpoint
from models.ensemble import adaptive, fuse
from models.errors import CxrError
from pipelines.artifacts import latest_checkpoint, latest_probes, load_settings
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import local_batches, shard_files
from pipelines.evaluate.gradcam_grid import pick_examples, plot_explanation_grid
from pipelines.evaluate.inference import predict_checkpoint
from pipelines.evaluate.metrics import covid_metrics, expected_calibration_error, headline, nih_auroc, scored_heads
from pipelines.evaluate.report import write_report
from pipelines.train import tracking

log = logging.getLogger(__name__)


class LabelSpaceMismatchError(CxrError, ValueError):
    """An extra checkpoint trained on other covid classes than the CNN: its rows would not compare."""


def checkpoint_recipe(payload: dict[str, Any]) -> str:
    """The ``train.recipe`` a checkpoint was trained with, from its stored config (``full`` when it has none)."""
    return ((payload.get("config") or {}).get("train") or {}).get("recipe") or "full"


def extra_label(payload: dict[str, Any]) -> str:
    """An extra checkpoint's row: its role and recipe, e.g. ``cnn linear probe``."""
    return f"{payload['role']} {checkpoint_recipe(payload).replace('_', ' ')}"


def predict_extras(
    cfg: Config, paths: list[Path], files: list[str], classes: tuple[str, ...], tta: int = 0
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, str]]]:
    """Predictions of extra checkpoints (linear probes) by the same path as the CNN's, keyed by row label, and
    what each row is (checkpoint, role, recipe)."""
    preds: dict[str, dict[str, np.ndarray]] = {}
    about: dict[str, dict[str, str]] = {}
    for path in paths:
        payload = load_checkpoint(path)
        if tuple(payload["label_spaces"]["covid"]) != classes:
            raise LabelSpaceMismatchError(
                f"{path}: covid classes {payload['label_spaces']['covid']} differ from the CNN's {list(classes)}"
            )
        base = extra_label(payload)
        label, n = base, 1
        while label in preds:  # two probes of one role and recipe: "cnn linear probe (2)"
            n += 1
            label = f"{base} ({n})"
        model = model_from_checkpoint(None, payload)
        preds[label] = predict_checkpoint(cfg, path, files, tta, model)
        about[label] = {"checkpoint": str(path), "role": payload["role"], "recipe": checkpoint_recipe(payload)}
        log.info("extra row %r: %s", label, path)
    return preds, about


def full_metrics(pred: dict[str, np.ndarray], classes: tuple[str, ...]) -> dict[str, Any]:
    nih, covid = pred["source"] == 0, pred["source"] == 1
    covid_probs = pred["covid"][covid]
    correct = covid_probs.argmax(axis=1) == pred["covid_label"][covid]
    nih_probs, nih_labels = pred["nih14"][nih], pred["nih_labels"][nih]
    return {
        "headline": headline(pred, classes),
        "nih14": nih_auroc(nih_labels, nih_probs),
        "covid": covid_metrics(pred["covid_label"][covid], covid_probs, classes),
        "calibration": {
            "covid": expected_calibration_error(covid_probs.max(axis=1), correct),
            "nih14": expected_calibration_error(nih_probs.ravel(), nih_labels.ravel()),
        },
    }


def evaluate(
    cfg: Config,
    cnn_dir: Path,
    vit_dir: Path,
    out: Path,
    tta: int = 0,
    ensemble: Path | None = None,
    explain_per_class: int = 3,
    extras: list[Path] | None = None,
) -> dict[str, Any]:
    """``ensemble``: an ensemble.yaml; by default the one `cxr tune ensemble` wrote, else the config's values.
    ``explain_per_class``: test images per covid class and nih14 finding in the Grad-CAM grid (0: no grid).
    ``extras``: more checkpoints (linear probes), one row each after the ViT's."""
    files = shard_files(cfg.data.shards_dir, "test")
    payloads = {role: load_checkpoint(path) for role, path in (("cnn", cnn_dir), ("vit", vit_dir))}
    classes = tuple(payloads["cnn"]["label_spaces"]["covid"])
    models = {role: model_from_checkpoint(None, payload).eval() for role, payload in payloads.items()}
    checkpoints = {"cnn": cnn_dir, "vit": vit_dir}
    preds = {role: predict_checkpoint(cfg, checkpoints[role], files, tta, model) for role, model in models.items()}
    cnn, vit = preds["cnn"], preds["vit"]
    settings = load_settings(cfg, ensemble)
    w, threshold = settings.w_cnn, settings.threshold
    fused = {**cnn, **fuse(cnn, vit, w)}
    gated_probs, used_vit = adaptive(
        {h: cnn[h] for h in ("nih14", "covid")},
        {h: vit[h] for h in ("nih14", "covid")},
        w,
        threshold,
        scored_heads(cnn),
    )
    extra_preds, extra_about = predict_extras(cfg, list(extras or []), files, classes, tta)
    systems = {"cnn": cnn, "vit": vit, **extra_preds, "ensemble": fused, "adaptive": {**cnn, **gated_probs}}
    metrics = {name: full_metrics(pred, classes) for name, pred in systems.items()}
    metrics["adaptive"]["vit_fraction"] = float(used_vit.mean())
    summary = {
        "checkpoints": {"cnn": str(cnn_dir), "vit": str(vit_dir)},
        "extras": extra_about,
        "ensemble": {"w_cnn": w, "threshold": threshold, "source": settings.source},
        "tta_passes": tta,
        "test_images": int(len(cnn["source"])),
        "systems": metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    grid = None
    if explain_per_class > 0:
        examples = pick_examples(local_batches(files, cfg, False, 64), classes, explain_per_class)
        grid = plot_explanation_grid(out, models, examples, classes)
        summary["explanations"] = {"grid": grid, "labels": [f"{head}:{label}" for head, label in examples]}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary, systems, classes, grid)
    _log_to_mlflow(cfg, out, summary)
    return summary


def _log_to_mlflow(cfg: Config, out: Path, summary: dict[str, Any]) -> None:
    tracking.start_run(cfg, "evaluate", "cnn")
    try:
        for name, m in summary["systems"].items():
            key = name.replace(" ", "_")  # cnn linear probe -> test_cnn_linear_probe_<figure>
            mlflow.log_metrics({f"test_{key}_{k}": v for k, v in m["headline"].items() if v == v})
        mlflow.log_metric("test_adaptive_vit_fraction", summary["systems"]["adaptive"]["vit_fraction"])
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    finally:
        tracking.end_run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cnn", type=Path, help="CNN checkpoint dir (default: best of the last `cxr train --model cnn`)"
    )
    parser.add_argument(
        "--vit", type=Path, help="ViT checkpoint dir (default: best of the last `cxr train --model vit`)"
    )
    parser.add_argument(
        "--probe",
        type=Path,
        action="append",
        help="an extra checkpoint dir to report beside the others, labelled by its recipe; repeatable "
        "(default: the last linear probe of each role, from latest-<role>-probe.json, where there is one)",
    )
    parser.add_argument("--out", type=Path, help="report folder (default: <train.run_dir>/evaluation)")
    parser.add_argument(
        "--ensemble", type=Path, help="ensemble.yaml (default: <train.run_dir>/ensemble.yaml if present, else config)"
    )
    parser.add_argument(
        "--tta", type=int, default=0, help="extra augmented passes averaged in (test-time augmentation)"
    )
    parser.add_argument(
        "--explain-per-class",
        type=int,
        default=3,
        help="test images per covid class and nih14 finding in the report's Grad-CAM grid (0: none)",
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    cnn = args.cnn or latest_checkpoint(cfg, "cnn")
    vit = args.vit or latest_checkpoint(cfg, "vit")
    out = args.out or Path(cfg.train.run_dir) / "evaluation"
    extras = args.probe if args.probe is not None else latest_probes(cfg)
    summary = evaluate(cfg, cnn, vit, out, args.tta, args.ensemble, args.explain_per_class, extras)
    width = max(10, *(len(name) + 2 for name in summary["systems"]))
    print(f"{'system':<{width}}{'nih14 AUROC':>12}{'abnormal':>10}{'covid acc':>11}{'covid F1':>10}{'ECE covid':>11}")
    for name, m in summary["systems"].items():
        h = m["headline"]
        print(
            f"{name:<{width}}{h['nih_macro_auroc']:>12.3f}{h['nih_abnormal_auroc']:>10.3f}{h['covid_accuracy']:>11.3f}"
            f"{h['covid_macro_f1']:>10.3f}{m['calibration']['covid']['ece']:>11.3f}"
        )
    ens = summary["ensemble"]
    print(
        f"adaptive gate (w_cnn {ens['w_cnn']:.2f}, threshold {ens['threshold']:.2f}, from {ens['source']}) sent "
        f"{summary['systems']['adaptive']['vit_fraction']:.1%} of test images to the ViT"
    )
    print(f"report: {out / 'report.md'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr evaluate`; also `python -m pipelines.evaluate.evaluation` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
