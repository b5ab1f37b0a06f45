"""The ingest manifest (counts per source, split and class; positive weights; config; seeds) and its summary."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import pipelines
from models.labels import NIH14, NO_FINDING
from pipelines.config import Config
from pipelines.data.layouts import Listing
from pipelines.data.splits import SPLITS


def positive_weights(rows: list[dict[str, Any]]) -> dict[str, float]:
    """BCE ``pos_weight`` per finding from the NIH training rows: negatives / positives (1.0 when absent)."""
    train = [r["nih_labels"] for r in rows if r["source"] == "nih" and r["split"] == "train"]
    weights = {}
    for k, name in enumerate(NIH14):
        positives = sum(labels[k] for labels in train)
        weights[name] = round((len(train) - positives) / positives, 4) if positives else 1.0
    return weights


def _class_counts(rows: list[dict[str, Any]], covid_classes: tuple[str, ...]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {"nih": {}, "covid": {}}
    for split in SPLITS:
        nih = [r["nih_labels"] for r in rows if r["source"] == "nih" and r["split"] == split]
        per_finding = {name: sum(labels[k] for labels in nih) for k, name in enumerate(NIH14)}
        per_finding[NO_FINDING] = sum(1 for labels in nih if not any(labels))
        counts["nih"][split] = per_finding
        covid = Counter(covid_classes[r["covid_label"]] for r in rows if r["source"] == "covid" and r["split"] == split)
        counts["covid"][split] = {name: covid.get(name, 0) for name in covid_classes}
    return counts


def build_manifest(
    cfg: Config,
    rows: list[dict[str, Any]],
    rejects: list[dict[str, str]],
    twins: list[dict[str, Any]],
    nih: Listing,
    covid: Listing,
    inputs: dict[str, Path],
) -> dict[str, Any]:
    images = Counter((r["source"], r["split"]) for r in rows)
    patients = {split: len({r["patient_id"] for r in rows if r["split"] == split}) for split in SPLITS}
    return {
        "project_version": pipelines.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {name: str(path) for name, path in inputs.items()},
        "storage": {"size": cfg.data.storage_size, "format": cfg.data.storage_format, "channels": 1},
        "label_spaces": {"nih14": list(NIH14), "covid": list(covid.classes)},
        "seeds": {"split_seed": cfg.data.split_seed},
        "images": {src: {split: images.get((src, split), 0) for split in SPLITS} for src in ("nih", "covid")},
        "patients": patients,
        "class_counts": _class_counts(rows, covid.classes),
        "positive_weights": positive_weights(rows),
        "rejects": dict(Counter(r["reason"] for r in rejects)),
        "rejects_total": len(rejects),
        "input_files": len(nih.rows) + len(nih.rejects) + len(covid.rows) + len(covid.rejects),
        "nih_csv_rows_without_image": nih.missing_images,
        "twins": len(twins),
        "config": cfg.model_dump(mode="json"),
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """A plain-text table a person reads at the end of ``cxr ingest``."""
    lines = [f"{'source':<8}{'train':>8}{'val':>8}{'test':>8}{'total':>9}"]
    for source, per_split in manifest["images"].items():
        total = sum(per_split.values())
        lines.append(f"{source:<8}" + "".join(f"{per_split[s]:>8}" for s in SPLITS) + f"{total:>9}")
    counts = manifest["class_counts"]
    lines.append("")
    lines.append(f"{'class':<22}{'train':>8}{'val':>8}{'test':>8}")
    for source in ("nih", "covid"):
        for name in counts[source]["train"]:
            lines.append(
                f"{source}:{name:<{21 - len(source)}}" + "".join(f"{counts[source][s][name]:>8}" for s in SPLITS)
            )
    rejects = ", ".join(f"{k}={v}" for k, v in sorted(manifest["rejects"].items())) or "none"
    lines += [
        "",
        f"input files: {manifest['input_files']}   rejected: {manifest['rejects_total']} ({rejects})",
        f"NIH CSV rows without an image on disk: {manifest['nih_csv_rows_without_image']}",
        f"cross-dataset twins kept in one split: {manifest['twins']}",
        f"time: {manifest.get('seconds', '?')} s",
    ]
    return "\n".join(lines)
