"""The adaptive ensemble rule, one implementation for evaluation, tuning and serving.

- Fusion per head: ``p = w_cnn * p_cnn + (1 - w_cnn) * p_vit``.
- Confidence of a prediction: for a multi-class head the max softmax probability; for a multi-label head the
  confidence of its least certain class, ``min_k max(p_k, 1 - p_k)`` (``LabelSpace.confidence``); a sample's
  confidence is the lowest of the heads it is scored on.
- Gate: the CNN answers alone when its confidence >= threshold; otherwise the ViT is consulted and fused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.labels import LabelSpace

Spaces = Mapping[str, LabelSpace]


def confidence(
    probs: Mapping[str, np.ndarray], spaces: Spaces, scored: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """Per-sample confidence: the lowest over the heads each sample is scored on.

    ``spaces`` maps each head to its label space (``models.labels.by_head``). ``scored`` maps head -> boolean mask
    of the samples scored on that head (default: every sample on every head in ``probs``, as in serving, where one
    image is answered by every head).
    """
    result = None
    for head, head_probs in probs.items():
        if head not in spaces:
            raise KeyError(f"unknown head {head!r}; expected one of {', '.join(spaces)}")
        conf = spaces[head].confidence(head_probs)
        if scored is not None:
            conf = np.where(np.asarray(scored[head], dtype=bool), conf, np.inf)
        result = conf if result is None else np.minimum(result, conf)
    if result is None:
        raise ValueError("no head probabilities given")
    return result


def refer_floor(confidences: np.ndarray, coverage: float) -> float:
    """The confidence below which an answer is referred so that ``coverage`` of these answers stand."""
    if coverage >= 1.0 or not len(confidences):
        return 0.0
    return float(np.quantile(np.asarray(confidences, dtype=float), 1.0 - coverage))


def fuse(p_cnn: Mapping[str, np.ndarray], p_vit: Mapping[str, np.ndarray], w_cnn: float) -> dict[str, np.ndarray]:
    if not 0.0 <= w_cnn <= 1.0:
        raise ValueError(f"w_cnn must be in [0, 1], got {w_cnn}")
    return {head: w_cnn * np.asarray(p_cnn[head]) + (1.0 - w_cnn) * np.asarray(p_vit[head]) for head in p_cnn}


def needs_vit(
    p_cnn: Mapping[str, np.ndarray], spaces: Spaces, threshold: float, scored: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """Boolean mask of the samples whose CNN confidence is below the gate's threshold."""
    return confidence(p_cnn, spaces, scored) < threshold


def adaptive(
    p_cnn: Mapping[str, np.ndarray],
    p_vit: Mapping[str, np.ndarray],
    spaces: Spaces,
    w_cnn: float,
    threshold: float,
    scored: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Gated predictions for samples where both models' outputs are at hand (evaluation, tuning).

    Returns (probabilities per head, mask of the samples that used the ViT). Serving calls ``needs_vit`` first
    and runs the ViT only on those samples, then ``fuse``; the answers are the same.
    """
    use_vit = needs_vit(p_cnn, spaces, threshold, scored)
    fused = fuse(p_cnn, p_vit, w_cnn)
    out = {}
    for head in p_cnn:
        mask = use_vit.reshape((-1,) + (1,) * (np.asarray(p_cnn[head]).ndim - 1))
        out[head] = np.where(mask, fused[head], np.asarray(p_cnn[head]))
    return out, use_vit
