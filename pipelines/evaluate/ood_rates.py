"""How the out-of-distribution check behaves: refusals on the test split (false refusals), on every kind of
non-radiograph (``negatives.py``) and on any folders of images the user names (``cxr evaluate --ood-images DIR``,
e.g. real radiographs a demo model never saw), with the report's section that reads them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.ood import OodDetector
from pipelines.data.imaging import ImageDecodeError, decode_gray
from pipelines.data.shards import stored_images
from pipelines.evaluate.markdown import table
from pipelines.evaluate.negatives import negatives

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _rate(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    return {
        "images": len(scores),
        "refused": float((scores > threshold).mean()) if len(scores) else float("nan"),
        "median_score": float(np.median(scores)) if len(scores) else float("nan"),
    }


def folder_images(folder: Path) -> list[np.ndarray]:
    """Every PNG/JPEG under ``folder`` (recursively), decoded as serving decodes it; undecodable files are skipped."""
    images = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            images.append(decode_gray(path.read_bytes())[0])
        except ImageDecodeError:
            continue
    return images


def ood_rates(
    detector: OodDetector, test_files: list[str], per_kind: int, seed: int = 0, folders: Sequence[Path] = ()
) -> dict[str, Any]:
    """The check's threshold, its refusal rate on the test split (all and per source), on each negative kind and on
    each folder; also the ms an image the scoring took."""
    images, sources = stored_images(test_files)
    started = time.perf_counter()
    scores = detector.scores(images)
    per_image_ms = (time.perf_counter() - started) / max(1, len(images)) * 1e3
    threshold = detector.threshold
    by_source = {str(source): _rate(scores[sources == source], threshold) for source in np.unique(sources)}
    made = negatives(per_kind, seed) if per_kind else {}
    return {
        "threshold": threshold,
        "false_refusal_target": detector.false_refusal,
        "score_ms": per_image_ms,
        "test": {**_rate(scores, threshold), "by_source": by_source},
        "negatives": {kind: _rate(detector.scores(found), threshold) for kind, found in made.items()},
        "folders": {str(folder): _rate(detector.scores(folder_images(folder)), threshold) for folder in folders},
    }


def ood_section(found: dict[str, Any] | None) -> list[str]:
    """The report's section: what was refused, and a reading of it."""
    if not found:
        return [
            "",
            "## Out-of-distribution refusal",
            "",
            "No check: the ensemble.yaml in use has none (run `cxr tune ensemble`), so serving answers any image.",
        ]
    test = found["test"]
    rows = [["test split (all)", str(test["images"]), f"{test['refused']:.1%}", f"{test['median_score']:.2f}"]]
    rows += [[f"test: {s}", str(r["images"]), f"{r['refused']:.1%}", f"{r['median_score']:.2f}"]
             for s, r in test["by_source"].items()]  # fmt: skip
    rows += [[f"negative: {k}", str(r["images"]), f"{r['refused']:.1%}", f"{r['median_score']:.2f}"]
             for k, r in found["negatives"].items()]  # fmt: skip
    rows += [[f"folder: `{f}`", str(r["images"]), f"{r['refused']:.1%}", f"{r['median_score']:.2f}"]
             for f, r in found["folders"].items()]  # fmt: skip
    missed = [kind for kind, r in found["negatives"].items() if r["refused"] < 1.0]
    target = found["false_refusal_target"]
    lines = ["", "## Out-of-distribution refusal", ""]
    lines.append(
        f"Serving refuses an image scoring above **{found['threshold']:.2f}** (422 `not_a_chest_radiograph`; "
        f"threshold set to refuse {target:.0%} of the validation images; `models/ood.py`, about "
        f"{found['score_ms']:.2f} ms an image here). Test-split rows are false refusals; negatives are images that "
        "are not chest radiographs and should all be refused."
    )
    lines += ["", *table(["images", "count", "refused", "median score"], rows), ""]
    lines.append(
        "Every negative kind was refused in full."
        if not missed
        else f"Not every negative was refused ({', '.join(missed)}): those kinds can reach the models and get answers."
    )
    lines.append(
        "The check knows only the training split: radiographs unlike it (another hospital's scanner, a child, a "
        "portable film, or real images for a model trained on generated ones) are refused too, which is what it is "
        "for: the models' answers on them are untested. A refusal says *not like the training images*, not *not a "
        "chest*."
    )
    return lines
