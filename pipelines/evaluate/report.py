"""The evaluation report: ``report.md`` with tables, and PNG plots (ROC curves, reliability diagrams,
confusion matrices) drawn with matplotlib's non-interactive backend. Every system of the summary (the CNN, the ViT,
extra checkpoints such as a linear probe, the fused and the gated ensemble) gets a row, a column and a panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.labels import NIH14  # noqa: E402


def plot_roc(out: Path, systems: dict[str, dict[str, np.ndarray]]) -> str:
    fig, axes = plt.subplots(1, len(systems), figsize=(4.2 * len(systems), 4), sharey=True)
    for ax, (name, pred) in zip(np.atleast_1d(axes), systems.items(), strict=True):
        nih = pred["source"] == 0
        for k, finding in enumerate(NIH14):
            labels = pred["nih_labels"][nih][:, k]
            if 0 < labels.sum() < len(labels):
                fpr, tpr, _ = roc_curve(labels, pred["nih14"][nih][:, k])
                ax.plot(fpr, tpr, lw=1, label=finding)
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set_title(f"{name}: nih14 ROC")
        ax.set_xlabel("false positive rate")
    np.atleast_1d(axes)[0].set_ylabel("true positive rate")
    np.atleast_1d(axes)[-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc_nih14.png", dpi=110)
    plt.close(fig)
    return "roc_nih14.png"


def plot_reliability(out: Path, metrics: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, m in metrics.items():
        bins = m["calibration"]["covid"]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", ms=3,
                label=f"{name} (ECE {m['calibration']['covid']['ece']:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    ax.set(
        xlabel="confidence (max softmax)", ylabel="accuracy", title="covid head reliability", xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability_covid.png", dpi=110)
    plt.close(fig)
    return "reliability_covid.png"


def plot_confusion(out: Path, metrics: dict[str, Any], classes: tuple[str, ...]) -> str:
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4))
    for ax, (name, m) in zip(np.atleast_1d(axes), metrics.items(), strict=True):
        matrix = np.array(m["covid"]["confusion"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(out / "confusion_covid.png", dpi=110)
    plt.close(fig)
    return "confusion_covid.png"


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def describe_extras(extras: dict[str, dict[str, str]]) -> list[str]:
    """A paragraph per extra row (``summary["extras"]``): what the checkpoint is and where it lies."""
    lines = []
    for label, extra in extras.items():
        if extra["recipe"] == "linear_probe":
            what = (
                f"the {extra['role'].upper()}'s linear heads trained on a frozen backbone "
                "(`train.recipe=linear_probe`), a sanity baseline: the fine-tuned models should beat it"
            )
        else:
            what = f"a {extra['role'].upper()} trained with `train.recipe={extra['recipe']}`"
        lines += ["", f"**{label}**: {what} (`{extra['checkpoint']}`)."]
    return lines


def write_report(
    out: Path,
    summary: dict[str, Any],
    systems: dict[str, dict[str, np.ndarray]],
    classes: tuple[str, ...],
    explanation_grid: str | None = None,
) -> Path:
    metrics = summary["systems"]
    plots = [plot_roc(out, systems), plot_reliability(out, metrics), plot_confusion(out, metrics, classes)]
    names = list(metrics)
    ens = summary["ensemble"]
    lines = [
        "# Evaluation on the test split",
        "",
        f"{summary['test_images']} test images; ensemble w_cnn={ens['w_cnn']:.3f}, threshold={ens['threshold']:.3f} "
        f"(from {ens.get('source', 'config')}); "
        f"test-time augmentation passes: {summary['tta_passes']}.",
        f"The adaptive gate sent **{metrics['adaptive']['vit_fraction']:.1%}** of the test images to the ViT.",
        *describe_extras(summary.get("extras") or {}),
        "",
        "| system | nih14 macro AUROC | nih14 abnormal AUROC | covid accuracy | covid macro F1 | covid ECE "
        "| nih14 ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        h, cal = metrics[name]["headline"], metrics[name]["calibration"]
        lines.append(
            f"| {name} | {_fmt(h['nih_macro_auroc'])} | {_fmt(h['nih_abnormal_auroc'])} | {_fmt(h['covid_accuracy'])} "
            f"| {_fmt(h['covid_macro_f1'])} "
            f"| {_fmt(cal['covid']['ece'])} | {_fmt(cal['nih14']['ece'])} |"
        )
    lines += [
        "",
        "## nih14 AUROC per finding",
        "",
        "| finding | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for finding in NIH14:
        lines.append(
            f"| {finding} | " + " | ".join(_fmt(metrics[n]["nih14"]["per_finding"][finding]) for n in names) + " |"
        )
    lines += [
        "",
        "## covid per class (precision / recall / F1)",
        "",
        "| class | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for cls in classes:
        cells = []
        for n in names:
            c = metrics[n]["covid"]["per_class"][cls]
            cells.append(f"{c['precision']:.2f} / {c['recall']:.2f} / {c['f1']:.2f}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if explanation_grid:
        lines += [
            "",
            "## Where the models look (Grad-CAM)",
            "",
            "A few test images per covid class and nih14 finding, with each model's map of the true label "
            "(`models/explain.py`, as `POST /v1/explain` serves it).",
            "",
            f"![{explanation_grid}]({explanation_grid})",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
