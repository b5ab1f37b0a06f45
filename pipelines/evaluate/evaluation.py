"""`cxr evaluate`: the CNN, the ViT, the always-fused and the gated ensemble side by side on the test split, with a
row per extra checkpoint: the last linear probe of each role (``latest-<role>-probe.json``) or ``--probe DIR``, a
sanity baseline labelled by its role and recipe (``cnn linear probe``); and, for a model with the metadata fusion
head, a row of the same model on the same rows with the metadata hidden (``cnn without metadata``).

Every head of the checkpoint's label spaces is scored on the images of its own source (``metrics.head_metrics``,
``metrics.head_calibration``); the adaptive gate decides each image on its own source's head, as tuning does.
The CNN, ViT and both ensembles' figures get 95% intervals from a patient-level bootstrap (``uncertainty.py``);
the adaptive ensemble's multi-label heads are scored per sex, age band and view position (``subgroups.py``); stage
B's out-of-distribution check is run on the test split and on non-radiographs (``ood_rates.py``); the CNN's frozen
features are probed for the source dataset and the adaptive answers checked on other sources (``shortcut.py``).
Writes ``report.md`` (a section per head), ``metrics.json`` and PNG plots (ROC curves, reliability diagrams,
confusion matrices per head, a grid of Grad-CAM overlays per class) and logs them to MLflow. Predictions come from
``inference.py``: in this process for small splits, as Ray Data batch inference for large ones, row for row the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from models.calibration import calibrate
from models.checkpoint import label_spaces_of, load_checkpoint, model_from_checkpoint
from models.ensemble import adaptive, fuse
from models.errors import CxrError
from models.labels import LabelSpace, by_head
from pipelines.artifacts import latest_checkpoint, latest_probes, load_settings
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import local_batches, shard_files
from pipelines.data.transforms import TransformSpec
from pipelines.evaluate.gradcam_grid import pick_examples, plot_explanation_grid
from pipelines.evaluate.inference import predict_checkpoint, predict_local
from pipelines.evaluate.metrics import head_calibration, head_metrics, headline, scored_heads
from pipelines.evaluate.ood_rates import ood_rates
from pipelines.evaluate.referral import risk_coverage
from pipelines.evaluate.report import head_figures, write_report
from pipelines.evaluate.shortcut import shortcut_check
from pipelines.evaluate.subgroups import subgroup_fields, subgroup_metrics
from pipelines.evaluate.uncertainty import bootstrap_intervals, patient_groups
from pipelines.train import tracking

log = logging.getLogger(__name__)
INTERVAL_SYSTEMS = ("cnn", "vit", "ensemble", "adaptive")  # the rows that get bootstrap intervals
SUBGROUP_SYSTEM = "adaptive"  # the answers serving gives: the row checked per subgroup


class LabelSpaceMismatchError(CxrError, ValueError):
    """A checkpoint whose heads (names, classes or order) differ from the CNN's: its rows would not compare."""


class ReportFolderError(CxrError, ValueError):
    """``--out`` holds the run folder, whose MLflow artifact store the report is copied into: it would copy itself."""


def require_spaces(path: Path, payload: dict[str, Any], spaces: tuple[LabelSpace, ...]) -> None:
    """Fail, naming both, when a checkpoint's label spaces are not the CNN's."""
    found = label_spaces_of(payload)
    if found != spaces:
        raise LabelSpaceMismatchError(
            f"{path}: heads {[(s.head, s.classes) for s in found]} differ from the CNN's "
            f"{[(s.head, s.classes) for s in spaces]}"
        )


def checkpoint_recipe(payload: dict[str, Any]) -> str:
    """The ``train.recipe`` a checkpoint was trained with, from its stored config (``full`` when it has none)."""
    return ((payload.get("config") or {}).get("train") or {}).get("recipe") or "full"


def extra_label(payload: dict[str, Any]) -> str:
    """An extra checkpoint's row: its role and recipe, e.g. ``cnn linear probe``."""
    return f"{payload['role']} {checkpoint_recipe(payload).replace('_', ' ')}"


def predict_extras(
    cfg: Config, paths: list[Path], files: list[str], spaces: tuple[LabelSpace, ...], tta: int = 0
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, str]]]:
    """Predictions of extra checkpoints (linear probes) by the same path as the CNN's, keyed by row label, and
    what each row is (checkpoint, role, recipe)."""
    preds: dict[str, dict[str, np.ndarray]] = {}
    about: dict[str, dict[str, str]] = {}
    for path in paths:
        payload = load_checkpoint(path)
        require_spaces(path, payload, spaces)
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


def full_metrics(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace]) -> dict[str, Any]:
    """One system's figures: the headline (``metrics.headline``), every head's full metrics on its own source's rows
    (``heads``, empty for a head without test rows) and its calibration (``calibration``)."""
    heads = {space.head: head_metrics(space, pred, index) for index, space in enumerate(spaces)}
    return {
        "headline": headline(pred, spaces, heads),
        "heads": heads,
        "calibration": {space.head: head_calibration(space, pred, index) for index, space in enumerate(spaces)},
    }


def gated(
    cnn: dict[str, np.ndarray], vit: dict[str, np.ndarray], spaces: Sequence[LabelSpace], w: float, threshold: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The adaptive ensemble's predictions (labels kept) and which images it sent to the ViT; each image is gated
    on its own source's head, as in tuning."""
    heads = [space.head for space in spaces]
    probs, used_vit = adaptive(
        {h: cnn[h] for h in heads}, {h: vit[h] for h in heads}, by_head(spaces), w, threshold, scored_heads(cnn, spaces)
    )
    return {**cnn, **probs}, used_vit


def evaluate(
    cfg: Config,
    cnn_dir: Path,
    vit_dir: Path,
    out: Path,
    tta: int = 0,
    ensemble: Path | None = None,
    explain_per_class: int = 3,
    extras: list[Path] | None = None,
    ood_folders: list[Path] | None = None,
) -> dict[str, Any]:
    """``ensemble``: an ensemble.yaml; by default the one `cxr tune ensemble` wrote, else the config's values.
    ``explain_per_class``: test images per class of every head in the Grad-CAM grid (0: no grid).
    ``extras``: more checkpoints (linear probes), one row each after the ViT's.
    ``ood_folders``: folders of images the out-of-distribution check is also run on (e.g. real radiographs)."""
    files = shard_files(cfg.data.shards_dir, "test")
    payloads = {role: load_checkpoint(path) for role, path in (("cnn", cnn_dir), ("vit", vit_dir))}
    spaces = label_spaces_of(payloads["cnn"])
    require_spaces(vit_dir, payloads["vit"], spaces)
    models = {role: model_from_checkpoint(None, payload).eval() for role, payload in payloads.items()}
    checkpoints = {"cnn": cnn_dir, "vit": vit_dir}
    raw = {role: predict_checkpoint(cfg, checkpoints[role], files, tta, model) for role, model in models.items()}
    settings = load_settings(cfg, ensemble)
    # each model's probabilities at the temperatures stage B fitted (none: as they are), as serving answers
    temperatures = {role: settings.temperatures.get(role, {}) for role in models}
    preds = {role: calibrate(pred, spaces, temperatures[role]) for role, pred in raw.items()}
    cnn, vit = preds["cnn"], preds["vit"]
    w, threshold = settings.w_cnn, settings.threshold
    fused = {**cnn, **fuse({s.head: cnn[s.head] for s in spaces}, {s.head: vit[s.head] for s in spaces}, w)}
    adaptive_pred, used_vit = gated(cnn, vit, spaces, w, threshold)
    extra_preds, extra_about = predict_extras(cfg, list(extras or []), files, spaces, tta)
    hidden = {
        f"{role} without metadata": calibrate(
            predict_local(model, cfg, files, tta, use_metadata=False), spaces, temperatures[role]
        )
        for role, model in models.items()
        if model.uses_metadata
    }
    systems = {"cnn": cnn, "vit": vit, **hidden, **extra_preds, "ensemble": fused, "adaptive": adaptive_pred}
    metrics = {name: full_metrics(pred, spaces) for name, pred in systems.items()}
    metrics["adaptive"]["vit_fraction"] = float(used_vit.mean()) if len(used_vit) else 0.0
    if cfg.evaluate.bootstrap_replicates:
        groups = patient_groups(files)
        for name in INTERVAL_SYSTEMS:
            metrics[name]["intervals"] = bootstrap_intervals(
                systems[name], spaces, groups, cfg.evaluate.bootstrap_replicates, seed=cfg.data.split_seed
            )
    fields = subgroup_fields(files)
    detector = settings.ood_detector()  # stage B's refusal check, if ensemble.yaml has one
    ood_seed, per_kind = cfg.data.split_seed, cfg.ood.negatives_per_kind
    summary = {
        "checkpoints": {"cnn": str(cnn_dir), "vit": str(vit_dir)},
        "extras": extra_about,
        "metadata_fusion": {role: model.uses_metadata for role, model in models.items()},
        "ensemble": {"w_cnn": w, "threshold": threshold, "source": settings.source},
        "tta_passes": tta,
        "bootstrap_replicates": cfg.evaluate.bootstrap_replicates,
        "test_images": int(len(cnn["source"])),
        "label_spaces": [space.to_dict() for space in spaces],
        "test_images_per_head": {s.head: int((cnn["source"] == i).sum()) for i, s in enumerate(spaces)},
        "systems": metrics,
        "subgroups": {SUBGROUP_SYSTEM: subgroup_metrics(systems[SUBGROUP_SYSTEM], spaces, fields)},
        "temperature_scaling": temperature_table(raw, preds, spaces, temperatures),
        "referral": {
            "refer_below": settings.refer_below,
            "heads": risk_coverage(adaptive_pred, spaces, settings.refer_below),
        },
        "ood": ood_rates(detector, files, per_kind, ood_seed, ood_folders or []) if detector else None,
        # the CNN's frozen features probed for the source; the answers serving gives checked on other sources
        "shortcut": shortcut_check(models["cnn"], cfg, files, systems[SUBGROUP_SYSTEM], spaces),
    }
    out.mkdir(parents=True, exist_ok=True)
    grid = None
    if explain_per_class > 0:
        spec = TransformSpec.from_config(cfg, spaces)  # the CNN's heads: ``source`` indexes ``spaces``
        examples = pick_examples(local_batches(files, spec, False, 64), spaces, explain_per_class)
        grid = plot_explanation_grid(out, models, examples, spaces)
        summary["explanations"] = {"grid": grid, "labels": [f"{head}:{label}" for head, label in examples]}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary, systems, spaces, grid)
    _log_to_mlflow(cfg, out, summary)
    return summary


def temperature_table(raw: dict, calibrated: dict, spaces: Sequence[LabelSpace], temperatures: dict) -> dict:
    """Per role and head: its temperature and the test split's ECE (and reliability bins) before and after it."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for role in raw:
        for index, space in enumerate(spaces):
            before = head_calibration(space, raw[role], index)
            after = head_calibration(space, calibrated[role], index)
            table.setdefault(role, {})[space.head] = {
                "temperature": float(temperatures[role].get(space.head, 1.0)),
                "ece_before": before["ece"],
                "ece_after": after["ece"],
                "bins_before": before["bins"],
                "bins_after": after["bins"],
            }
    return table


def _log_to_mlflow(cfg: Config, out: Path, summary: dict[str, Any]) -> None:
    tracking.start_run(cfg, "evaluate", "cnn")
    try:
        for name, m in summary["systems"].items():
            key = name.replace(" ", "_")  # cnn linear probe -> test_cnn_linear_probe_<figure>
            figures = {**m["headline"], **{f"{head}_ece": cal["ece"] for head, cal in m["calibration"].items()}}
            mlflow.log_metrics({f"test_{key}_{k}": v for k, v in figures.items() if v == v})
        mlflow.log_metric("test_adaptive_vit_fraction", summary["systems"]["adaptive"]["vit_fraction"])
        if summary.get("ood"):
            mlflow.log_metric("test_ood_refused", summary["ood"]["test"]["refused"])
            mlflow.log_metrics({f"ood_refused_{kind}": r["refused"] for kind, r in summary["ood"]["negatives"].items()})
        hardest = summary["shortcut"]["probe_healthy"]["min_pair"]
        if hardest is not None:
            mlflow.log_metric("shortcut_healthy_probe_auroc", hardest["auroc"])
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
        "--ood-images",
        type=Path,
        action="append",
        help="a folder of PNG/JPEG images the out-of-distribution check is also run on, reported beside the test "
        "split and the negatives (e.g. real radiographs); repeatable",
    )
    parser.add_argument(
        "--explain-per-class",
        type=int,
        default=3,
        help="test images per class of every head in the report's Grad-CAM grid (0: none)",
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    cnn = args.cnn or latest_checkpoint(cfg, "cnn")
    vit = args.vit or latest_checkpoint(cfg, "vit")
    out = args.out or Path(cfg.train.run_dir) / "evaluation"
    run_dir = Path(cfg.train.run_dir).resolve()
    if out.resolve() == run_dir or out.resolve() in run_dir.parents:
        raise ReportFolderError(f"--out {out} holds train.run_dir {run_dir} and its MLflow artifacts; give the report "
                                "a folder of its own (default: <train.run_dir>/evaluation)")  # fmt: skip
    extras = args.probe if args.probe is not None else latest_probes(cfg)
    summary = evaluate(cfg, cnn, vit, out, args.tta, args.ensemble, args.explain_per_class, extras, args.ood_images)
    print(format_console(summary))
    ens = summary["ensemble"]
    print(
        f"adaptive gate (w_cnn {ens['w_cnn']:.2f}, threshold {ens['threshold']:.2f}, from {ens['source']}) sent "
        f"{summary['systems']['adaptive']['vit_fraction']:.1%} of test images to the ViT"
    )
    print(f"report: {out / 'report.md'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)}")
    return 0


def format_console(summary: dict[str, Any]) -> str:
    """A table per head (the report's figures table) and the score of every system."""
    systems = summary["systems"]
    width = max(10, *(len(name) + 2 for name in systems))
    lines = []
    for space in [LabelSpace.from_dict(item) for item in summary["label_spaces"]]:
        count = summary["test_images_per_head"][space.head]
        lines.append(f"head {space.head} ({count} test images)")
        figures = {name: head_figures(space, m) for name, m in systems.items()}
        columns = list(next(iter(figures.values())))
        sizes = {c: max(len(c), 5) + 2 for c in columns}
        lines.append(f"{'system':<{width}}" + "".join(f"{c:>{sizes[c]}}" for c in columns))
        for name, values in figures.items():
            lines.append(f"{name:<{width}}" + "".join(f"{values[c]:>{sizes[c]}.3f}" for c in columns))
        lines.append("")
    lines.append(f"{'system':<{width}}{'score':>8}")
    lines += [f"{name:<{width}}{m['headline']['score']:>8.3f}" for name, m in systems.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`cxr evaluate`; also `python -m pipelines.evaluate.evaluation` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
