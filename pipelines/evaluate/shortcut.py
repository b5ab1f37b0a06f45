"""The shortcut check of ``cxr evaluate``: can the model's features tell which dataset an image came from?

Models trained on collections from different hospitals can learn the source instead of the disease (DeGrave et al.,
Nature Machine Intelligence 2021): when one source holds most of a disease, "which hospital" predicts the label.
Two measurements on the test split, no Ray:

- a source probe: a logistic regression on the frozen pooled backbone features (standardised), scored by
  cross-validated AUROC, once on all images and once on the images without findings only (NIH "No Finding", the
  multi-class sets' normal class). All images differ by source by construction (other findings; a child's chest in
  the pediatric set), so the all-images probe says little on its own. Healthy images of two adult sets should look
  alike; if the features still tell them apart, the heads can read the source. The pediatric set's healthy images
  differ by anatomy too, so every pair of sources gets its own probe and the check flags on the pair of sources
  that is hardest to tell apart (``flag_auroc``, default 0.85; see ``FLAG_AUROC``).
- confident calls on other sources: each multi-class head's disease answer on rows of the sources it was never
  trained on (none of them has that head's disease by construction): the share called with probability >=
  ``confidence``.

Neither proves nor rules out a shortcut: a probe finds a signal the heads may or may not use, and a model can lean
on a signal too weak for a linear probe.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.checkpoint import unwrap
from models.labels import LabelSpace, label_key
from pipelines.config import Config
from pipelines.data.shards import local_batches
from pipelines.data.transforms import TransformSpec
from pipelines.evaluate.markdown import table

log = logging.getLogger(__name__)

# Where to flag, measured on the demo (64 px test split, healthy NIH vs COVID-DB images; ``cxr synth`` with and
# without data.synth.source_marker): the demo CNN reads 0.76 on untagged and 0.88 on tagged images, a CNN trained on
# tagged images 0.81 and 0.89 (an untrained tiny CNN: about 0.4 and 0.99). Untagged sets already differ a little
# (original size and processing); 0.85 flags only a signal beyond that. A trained model keeps a tag only partly:
# each head is trained on one source, where the tag is the same on every row and tells it nothing.
FLAG_AUROC = 0.85
REPEATS = 3
MIN_ROWS = 10  # a source with fewer rows in a probe is skipped (5 folds need a few rows of each side per fold)
FOLDS = 5
# heads whose disease answer is one class; other multi-class heads: every class outside their negatives
DISEASE_CLASSES = {"covid": ("COVID",)}
HEALTHY_NAMES = ("normal", "no finding")  # a multi-class head without negatives: its class of this name is healthy


def pooled_features(model: torch.nn.Module, cfg: Config, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features ``[N, F]`` float32 and ``source`` ``[N]`` of every row of ``files``, through the
    batches ``predict_local`` reads (same order, same evaluation transform), so rows line up with predictions."""
    net = unwrap(model)
    spec = TransformSpec(net.input_size, tuple(net.label_spaces), **cfg.data.augment.model_dump())
    net.eval()
    device = next(net.parameters()).device
    features, sources = [], []
    with torch.inference_mode():
        for batch in local_batches(files, spec, False, cfg.evaluate.batch_size):
            features.append(net.backbone(net.normalize(batch["image"].to(device))).float().cpu().numpy())
            sources.append(batch["source"].cpu().numpy())
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(features).astype(np.float32), np.concatenate(sources).astype(np.int64)


def healthy_rows(preds: dict[str, np.ndarray], spaces: Sequence[LabelSpace]) -> np.ndarray:
    """True on rows without findings: no NIH finding (multi-label, all zeros) or a multi-class head's healthy
    class (its ``negatives``, else the class named normal)."""
    source = np.asarray(preds["source"])
    healthy = np.zeros(len(source), bool)
    for index, space in enumerate(spaces):
        if label_key(space.head) not in preds:
            continue
        own = source == index
        labels = np.asarray(preds[label_key(space.head)])
        if space.multi_label:
            healthy |= own & (labels.sum(axis=-1) == 0)
            continue
        names = space.negatives or tuple(c for c in space.classes if c.lower() in HEALTHY_NAMES)
        healthy |= own & np.isin(labels, [space.class_index(name) for name in names])
    return healthy


def _cv_scores(features: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities of a standardised logistic regression (stratified k-fold), averaged over
    ``REPEATS`` fold splits: on a few hundred rows one split moves the AUROC by about 0.02."""
    folds = min(FOLDS, int(np.bincount(target).min()))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    runs = [
        cross_val_predict(probe, features, target, cv=StratifiedKFold(folds, shuffle=True, random_state=seed + r),
                          method="predict_proba")
        for r in range(REPEATS)
    ]  # fmt: skip
    return np.mean(runs, axis=0)


def source_probe(
    features: np.ndarray, source: np.ndarray, names: Sequence[str], min_rows: int = MIN_ROWS, seed: int = 0
) -> dict[str, Any]:
    """Cross-validated AUROC of telling the sources apart from ``features``: ``auroc`` (macro one-vs-rest over the
    sources kept, plain AUROC for two), ``pairs`` (one probe per pair of sources), ``min_pair`` (the hardest pair),
    ``rows`` per source and ``skipped`` (sources with fewer than ``min_rows`` rows; None AUROCs when < 2 are left)."""
    source = np.asarray(source)
    rows = {names[s]: int((source == s).sum()) for s in range(len(names)) if (source == s).any()}
    kept = [s for s in range(len(names)) if (source == s).sum() >= min_rows]
    result: dict[str, Any] = {"auroc": None, "pairs": {}, "min_pair": None, "rows": rows}
    result["skipped"] = sorted(name for name in rows if name not in {names[s] for s in kept})
    if len(kept) < 2:
        return result
    mask = np.isin(source, kept)
    target = np.searchsorted(kept, source[mask])  # 0..len(kept)-1
    scores = _cv_scores(features[mask], target, seed)
    if len(kept) == 2:
        result["auroc"] = float(roc_auc_score(target, scores[:, 1]))
    else:
        result["auroc"] = float(roc_auc_score(target, scores, multi_class="ovr", average="macro"))
    for a, b in itertools.combinations(kept, 2):
        pair = np.isin(source, (a, b))
        pair_scores = _cv_scores(features[pair], (source[pair] == b).astype(np.int64), seed)
        result["pairs"][f"{names[a]} vs {names[b]}"] = float(roc_auc_score(source[pair] == b, pair_scores[:, 1]))
    hardest = min(result["pairs"], key=result["pairs"].get)
    result["min_pair"] = {"pair": hardest, "auroc": result["pairs"][hardest]}
    return result


def _disease_classes(space: LabelSpace) -> tuple[str, ...]:
    named = DISEASE_CLASSES.get(space.head)
    if named is not None:
        return tuple(name for name in named if name in space.classes)
    return tuple(name for name in space.classes if name not in space.negatives) if space.negatives else ()


def confident_calls(
    preds: dict[str, np.ndarray], spaces: Sequence[LabelSpace], confidence: float = 0.9
) -> list[dict[str, Any]]:
    """Per multi-class head with a disease answer and per other source: ``rows`` and the ``rate`` whose P(disease)
    (summed over the disease classes) is >= ``confidence``; the same on that source's healthy rows (``healthy_rows``,
    ``healthy_rate``, None without any), where such a call is plainly wrong. Heads absent from ``preds`` are skipped."""
    source = np.asarray(preds["source"])
    healthy = healthy_rows(preds, spaces)
    calls = []
    for index, space in enumerate(spaces):
        classes = _disease_classes(space)
        if space.multi_label or space.head not in preds or not classes:
            continue
        called = np.asarray(preds[space.head])[:, [space.class_index(c) for c in classes]].sum(axis=1) >= confidence
        for other, other_space in enumerate(spaces):
            rows, well = source == other, (source == other) & healthy
            if other == index or not rows.any():
                continue
            calls.append({
                "head": space.head, "called": "+".join(classes), "source": other_space.source,
                "rows": int(rows.sum()), "rate": float(called[rows].mean()),
                "healthy_rows": int(well.sum()), "healthy_rate": float(called[well].mean()) if well.any() else None,
            })  # fmt: skip
    return calls


def shortcut_check(
    model: torch.nn.Module,
    cfg: Config,
    files: list[str],
    preds: dict[str, np.ndarray],
    spaces: Sequence[LabelSpace],
    confidence: float = 0.9,
    flag_auroc: float = FLAG_AUROC,
) -> dict[str, Any]:
    """The check on the test ``files`` whose predictions are ``preds`` (``predict_local`` rows, same order): source
    probes on all and on healthy images, confident calls on other sources, ``flagged`` (the hardest pair of
    sources among healthy images is told apart with AUROC >= ``flag_auroc``) and a plain-English ``reading``."""
    features, source = pooled_features(model, cfg, files)
    if len(source) != len(preds["source"]) or not np.array_equal(source, preds["source"]):
        raise ValueError("the predictions do not line up with the rows of these shard files")
    names = [space.source for space in spaces]
    healthy = healthy_rows(preds, spaces)
    calls = confident_calls(preds, spaces, confidence)
    result: dict[str, Any] = {
        "features": int(features.shape[1]) if features.ndim == 2 else 0,
        "probe_all": source_probe(features, source, names),
        "probe_healthy": source_probe(features[healthy], source[healthy], names),
        "confidence": confidence,
        "flag_auroc": flag_auroc,
        "confident_calls": calls,
    }
    hardest = result["probe_healthy"]["min_pair"]
    result["flagged"] = bool(hardest is not None and hardest["auroc"] >= flag_auroc)
    result["reading"] = reading(result)
    for name, probe in (("all", result["probe_all"]), ("healthy", result["probe_healthy"])):
        if probe["skipped"]:
            log.info("shortcut probe (%s images): skipped %s, fewer than %d rows", name, probe["skipped"], MIN_ROWS)
    log.info("shortcut check: healthy-image probe %s, flagged %s", hardest, result["flagged"])
    return result


def _probe_sentence(result: dict[str, Any]) -> str:
    probe, limit = result["probe_healthy"], result["flag_auroc"]
    if probe["min_pair"] is None:
        return (
            f"Too few images without findings ({_rows_text(probe['rows'])}; {MIN_ROWS} per source needed) to "
            "probe whether the features tell the sources apart: the check could not run."
        )
    hardest = probe["min_pair"]
    a, b = hardest["pair"].split(" vs ")
    separable = [f"{pair} {auroc:.2f}" for pair, auroc in probe["pairs"].items() if auroc >= limit]
    if result["flagged"]:
        text = (
            f"The image features tell healthy images of every pair of sources apart, even the closest pair, "
            f"{a} and {b}, with AUROC {hardest['auroc']:.2f} (flag at {limit:.2f}): the model encodes where an "
            "image came from when there is nothing to find, so its disease heads may be reading the source "
            "(a hospital's marker, scanner or processing) rather than the disease."
        )
    else:
        text = (
            f"The features tell healthy {a} and {b} images apart only weakly (AUROC {hardest['auroc']:.2f}, flag at "
            f"{limit:.2f}): no strong sign that the model reads the source of these images."
        )
    if separable and not result["flagged"]:
        text += (
            f" Some pairs separate well ({', '.join(separable)}); where a set holds other patients (children "
            "rather than adults, say) that is expected, and its head's answers on the other sets are extrapolation."
        )
    if probe["skipped"]:
        text += f" Too few healthy images to probe: {', '.join(probe['skipped'])} (fewer than {MIN_ROWS})."
    return text


def _calls_sentence(result: dict[str, Any]) -> str:
    rated = [c for c in result["confident_calls"] if c["healthy_rate"] is not None]
    if not rated:
        return ""
    worst = max(rated, key=lambda c: c["healthy_rate"])
    if worst["healthy_rate"] == 0:
        return (
            f" No head calls its disease with probability >= {result['confidence']:.2f} on a healthy image of "
            "another source."
        )
    return (
        f" On healthy {worst['source']} images the {worst['head']} head calls {worst['called']} with probability "
        f">= {result['confidence']:.2f} on {100 * worst['healthy_rate']:.0f}% of {worst['healthy_rows']} rows: "
        "a head's answers hold only for the kind of image it was trained on."
    )


def _rows_text(rows: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in rows.items()) or "none"


def reading(result: dict[str, Any]) -> str:
    """A short paragraph reading the check's numbers for a user or clinician, honest about its limits."""
    return (
        _probe_sentence(result) + _calls_sentence(result) + " A linear probe shows a signal the model could use, "
        "not whether its heads use it, and a low AUROC does not rule out a subtler shortcut: test on a hospital "
        "the model has never seen before trusting its scores."
    )


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _probe_table(result: dict[str, Any]) -> list[str]:
    pairs = list(result["probe_healthy"]["pairs"] or result["probe_all"]["pairs"])
    rows = []
    for label, probe in (("all", result["probe_all"]), ("no finding", result["probe_healthy"])):
        skipped = f" (skipped: {', '.join(probe['skipped'])})" if probe["skipped"] else ""
        cells = [label, _rows_text(probe["rows"]) + skipped, _auroc_text(probe["auroc"])]
        rows.append(cells + [_auroc_text(probe["pairs"].get(pair)) for pair in pairs])
    return table(["images", "rows per source", "all sources", *pairs], rows)


def _calls_table(result: dict[str, Any]) -> list[str]:
    if not result["confident_calls"]:
        return []
    at = f"P >= {result['confidence']:.2f}"
    rows = []
    for c in result["confident_calls"]:
        healthy = "n/a" if c["healthy_rate"] is None else f"{100 * c['healthy_rate']:.1f}%"
        cells = [c["head"], c["called"], c["source"], c["rows"], f"{100 * c['rate']:.1f}%", c["healthy_rows"], healthy]
        rows.append([str(cell) for cell in cells])
    return ["", *table(["head", "call", "on rows of", "rows", at, "healthy rows", f"{at} on healthy"], rows)]


def report_section(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the evaluation report: heading, probe and confident-call tables, the reading."""
    flag = "**flagged**" if result["flagged"] else "not flagged"
    intro = (
        f"Can the pooled image features tell which dataset an image came from? Cross-validated AUROC of a "
        f"linear source probe; {flag} at {result['flag_auroc']:.2f} on the closest pair of healthy images."
    )
    return [
        "",
        "## Shortcut check",
        "",
        intro,
        "",
        *_probe_table(result),
        *_calls_table(result),
        "",
        result["reading"],
        "",
    ]
