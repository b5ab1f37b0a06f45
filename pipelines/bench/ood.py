"""`cxr bench ood`: the two candidate out-of-distribution checks side by side, the measurement behind the choice.

Both are fitted on the same seeded sample of the training split and thresholded on the validation split at
``ood.false_refusal``, then run on the test split (false refusals), on every negative kind
(``pipelines/evaluate/negatives.py``) and on any ``--images`` folders (e.g. the real radiographs in
``../shared/real_samples``):

- ``layout``: the check serving uses (``models/ood.py``), a linear autoencoder's reconstruction error, Mahalanobis
  distance in its components and the contrast, on the image at ``ood.side`` px;
- ``cnn features``: the Mahalanobis distance of the CNN's pooled features (the checkpoint's backbone on the model
  input, as the router prepares it) to the training features' mean, with a Ledoit-Wolf shrunk covariance.

Per check: the share refused of each set and the ms an image (scoring alone; the CNN check also runs the backbone,
which serving would add to every request before the gate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.ood import OodDetector, threshold_at
from pipelines.artifacts import latest_checkpoint
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import shard_files, stored_images
from pipelines.evaluate.negatives import negatives
from pipelines.evaluate.ood_rates import folder_images

Scorer = Callable[[list[np.ndarray]], np.ndarray]


def layout_scorer(cfg: Config, train: list[np.ndarray]) -> Scorer:
    return OodDetector.fit(train, cfg.ood.side, cfg.ood.components).scores


def feature_scorer(checkpoint: Path, train: list[np.ndarray]) -> Scorer:
    """Mahalanobis distance of the CNN's pooled features; inputs made as serving makes them (``serve/preprocess.py``:
    the storage size, then the evaluation transform), from the pipelines' functions, which ``pipelines/`` may use."""
    import torch
    from sklearn.covariance import LedoitWolf

    from models.checkpoint import PreprocessSpec, load_checkpoint, model_from_checkpoint
    from pipelines.data.imaging import resize_square
    from pipelines.data.transforms import TransformSpec, build_transform, transform_images

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint, payload).eval()
    spec = PreprocessSpec.from_checkpoint_meta(payload)
    transform = build_transform(TransformSpec(spec.input_size), train=False)

    def features(images: list[np.ndarray]) -> np.ndarray:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), 64):
                stored = [resize_square(image, spec.storage_size) for image in images[start : start + 64]]
                batch = torch.from_numpy(np.stack(transform_images(stored, transform)))
                rows.append(model.backbone(model.normalize(batch)).numpy())
        return np.concatenate(rows)

    covariance = LedoitWolf().fit(features(train))
    return lambda images: covariance.mahalanobis(features(images))


def measure(scorer: Scorer, val: list[np.ndarray], sets: dict[str, list[np.ndarray]], false_refusal: float) -> dict:
    threshold = threshold_at(scorer(val), false_refusal)  # the rule serving's check uses
    found, seconds, count = {}, 0.0, 0
    for name, images in sets.items():
        started = time.perf_counter()
        scores = scorer(images)
        seconds, count = seconds + time.perf_counter() - started, count + len(images)
        found[name] = float((scores > threshold).mean())
    return {"refused": found, "ms_per_image": seconds / max(1, count) * 1e3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cnn", type=Path, help="CNN checkpoint (default: the last `cxr train --model cnn`)")
    parser.add_argument("--images", type=Path, action="append", default=[], help="a folder of images; repeatable")


def run(args: argparse.Namespace, cfg: Config) -> int:
    load_before = os.getloadavg()[0]
    checkpoint = args.cnn or latest_checkpoint(cfg, "cnn")
    shards, seed = cfg.data.shards_dir, cfg.data.split_seed
    train, _ = stored_images(shard_files(shards, "train"), cfg.ood.fit_images, seed)
    val, _ = stored_images(shard_files(shards, "val"))
    sets = {"test split": stored_images(shard_files(shards, "test"))[0]}
    sets.update({f"negative: {kind}": images for kind, images in negatives(cfg.ood.negatives_per_kind, seed).items()})
    sets.update({f"folder: {folder}": folder_images(folder) for folder in args.images})
    checks = {"layout": layout_scorer(cfg, train), "cnn features": feature_scorer(checkpoint, train)}
    results = {name: measure(scorer, val, sets, cfg.ood.false_refusal) for name, scorer in checks.items()}
    width = max(len(name) for name in sets) + 2
    print(f"{len(train)} training images fitted, thresholds at {cfg.ood.false_refusal:.0%} of {len(val)} validation")
    print(f"{'refused':<{width}}" + "".join(f"{name:>14}" for name in checks) + "   images")
    for name, images in sets.items():
        cells = "".join(f"{results[check]['refused'][name]:>14.1%}" for check in checks)
        print(f"{name:<{width}}{cells}   {len(images)}")
    print(f"{'ms an image':<{width}}" + "".join(f"{results[c]['ms_per_image']:>14.2f}" for c in checks))
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; CNN {checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench ood`; also `python -m pipelines.bench.ood`."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
