"""Stage B's out-of-distribution check: fitted on the training split, its threshold set on the validation split.

``models.ood.OodDetector`` is fitted on a seeded sample of ``ood.fit_images`` training images (every source
together: each is a chest radiograph the models learned from), then given the threshold that refuses
``ood.false_refusal`` of the validation images. It is written as ``ood.npz`` beside ensemble.yaml, which records
it under ``ood`` (file, threshold, rates), so the check travels with the gate and the temperatures it was tuned
with; serving and evaluation load it from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.ood import OodDetector
from pipelines.config import Config
from pipelines.data.shards import shard_files, stored_images

log = logging.getLogger(__name__)
DETECTOR_FILE = "ood.npz"


def fit_ood_check(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Fit, threshold and save the check; the record ensemble.yaml keeps under ``ood``."""
    settings = cfg.ood
    train, _ = stored_images(shard_files(cfg.data.shards_dir, "train"), settings.fit_images, cfg.data.split_seed)
    val, _ = stored_images(shard_files(cfg.data.shards_dir, "val"))
    detector = OodDetector.fit(train, settings.side, settings.components).with_threshold(val, settings.false_refusal)
    path = detector.save(Path(out_dir) / DETECTOR_FILE)
    refused = float((detector.scores(val) > detector.threshold).mean()) if val else 0.0
    log.info("OOD check: threshold %.3f refuses %.1f%% of %d validation images", detector.threshold, 100 * refused,
             len(val))  # fmt: skip
    return {
        "detector": path.name,  # beside ensemble.yaml
        "threshold": round(detector.threshold, 6),
        "false_refusal": settings.false_refusal,
        "validation_refused": round(refused, 4),
        "fit_images": len(train),
        "validation_images": len(val),
        "side": settings.side,
        "components": settings.components,
    }
