"""The ingest manifest (counts per source, split and class; label spaces; positive weights; config; seeds) and its
summary."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import pipelines
from models.labels import LabelSpace
from pipelines.config import Config
from pipelines.data.datasets import DATASETS, Listing
from pipelines.data.splits import SPLITS

NONE_OF_THEM = "none"  # the class-count row of multi-label rows with no class present (NIH's "No Finding")


def listing_label_space(listing: Listing) -> LabelSpace:
    """The dataset's label space over the classes this download has (a 3-class COVID release has no Lung_Opacity)."""
    space = DATASETS[listing.source].label_space
    return space.with_classes(listing.classes) if listing.classes and not space.multi_label else space


def positive_weights(rows: list[dict[str, Any]], spaces: list[LabelSpace]) -> dict[str, dict[str, float]]:
    """BCE ``pos_weight`` per class of each multi-label head, from its training rows: negatives / positives (1.0
    when a class has no positive)."""
    weights = {}
    for space in spaces:
        if not space.multi_label:
            continue
        train = [r["labels"] for r in rows if r["source"] == space.source and r["split"] == "train"]
        per_class = {}
        for k, name in enumerate(space.classes):
            positives = sum(labels[k] for labels in train)
            per_class[name] = round((len(train) - positives) / positives, 4) if positives else 1.0
        weights[space.head] = per_class
    return weights


def _class_counts(rows: list[dict[str, Any]], space: LabelSpace) -> dict[str, dict[str, int]]:
    counts = {}
    for split in SPLITS:
        labels = [r["labels"] for r in rows if r["source"] == space.source and r["split"] == split]
        if space.multi_label:
            per_class = {name: sum(vector[k] for vector in labels) for k, name in enumerate(space.classes)}
            per_class[NONE_OF_THEM] = sum(1 for vector in labels if not any(vector))
        else:
            found = Counter(vector[0] for vector in labels)
            per_class = {name: found.get(k, 0) for k, name in enumerate(space.classes)}
        counts[split] = per_class
    return counts


def build_manifest(
    cfg: Config,
    rows: list[dict[str, Any]],
    rejects: list[dict[str, str]],
    twins: list[dict[str, Any]],
    listings: list[Listing],
) -> dict[str, Any]:
    images = Counter((r["source"], r["split"]) for r in rows)
    patients = {split: len({r["patient_id"] for r in rows if r["split"] == split}) for split in SPLITS}
    spaces = [listing_label_space(listing) for listing in listings]
    sources = [listing.source for listing in listings]
    return {
        "project_version": pipelines.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {listing.source: str(listing.root) for listing in listings},  # the root relpaths are under
        "storage": {"size": cfg.data.storage_size, "format": cfg.data.storage_format, "channels": 1},
        "label_spaces": [space.to_dict() for space in spaces],  # in head order: what models trained here get
        "seeds": {"split_seed": cfg.data.split_seed},
        "images": {src: {split: images.get((src, split), 0) for split in SPLITS} for src in sources},
        "patients": patients,
        "class_counts": {space.source: _class_counts(rows, space) for space in spaces},
        "positive_weights": positive_weights(rows, spaces),
        "rejects": dict(Counter(r["reason"] for r in rejects)),
        "rejects_total": len(rejects),
        "input_files": sum(len(listing.rows) + len(listing.rejects) for listing in listings),
        "label_rows_without_image": {listing.source: listing.missing_images for listing in listings},
        "twins": len(twins),
        "config": cfg.model_dump(mode="json"),
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """A plain-text table a person reads at the end of ``cxr ingest``."""
    lines = [f"{'source':<10}{'train':>8}{'val':>8}{'test':>8}{'total':>9}"]
    for source, per_split in manifest["images"].items():
        total = sum(per_split.values())
        lines.append(f"{source:<10}" + "".join(f"{per_split[s]:>8}" for s in SPLITS) + f"{total:>9}")
    lines.append("")
    lines.append(f"{'class':<30}{'train':>8}{'val':>8}{'test':>8}")
    for source, counts in manifest["class_counts"].items():
        for name in counts["train"]:
            label = f"{source}:{name}"
            lines.append(f"{label:<30}" + "".join(f"{counts[s][name]:>8}" for s in SPLITS))
    rejects = ", ".join(f"{k}={v}" for k, v in sorted(manifest["rejects"].items())) or "none"
    missing = ", ".join(f"{k}={v}" for k, v in manifest["label_rows_without_image"].items() if v) or "none"
    lines += [
        "",
        f"input files: {manifest['input_files']}   rejected: {manifest['rejects_total']} ({rejects})",
        f"label rows without an image on disk: {missing}",
        f"cross-dataset twins kept in one split: {manifest['twins']}",
        f"time: {manifest.get('seconds', '?')} s",
    ]
    return "\n".join(lines)
