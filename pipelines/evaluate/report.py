"""The evaluation report: ``report.md`` with tables, and PNG plots drawn with matplotlib's non-interactive backend.

The report follows the checkpoint's label spaces: a summary table (the score and every head's main figure), then a
section per head, in head order, with its figures table, its per-class table and its plots (ROC curves, a
reliability diagram, and for a multi-class head a confusion matrix per system). Every system of the summary (the
CNN, the ViT, extra checkpoints such as a linear probe, the fused and the gated ensemble) gets a row, a column and a
panel. ``head_figures`` is the table both this report and the console print.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.labels import LabelSpace, label_key  # noqa: E402
from pipelines.evaluate.markdown import table  # noqa: E402
from pipelines.evaluate.metrics import binary_name, main_key  # noqa: E402
from pipelines.evaluate.ood_rates import ood_section  # noqa: E402
from pipelines.evaluate.shortcut import report_section  # noqa: E402
from pipelines.evaluate.subgroups import FLAG_BELOW, MIN_GROUP_IMAGES, MIN_POSITIVES  # noqa: E402


def head_figures(space: LabelSpace, metrics: dict[str, Any]) -> dict[str, float]:
    """One system's figures for a head, by column title: macro AUROC (multi-label) or accuracy, macro F1 and macro
    AUROC (multi-class); the derived binary answer's AUROC where the head has one; and the ECE."""
    found = metrics["heads"].get(space.head) or {}
    if space.multi_label:
        figures = {"macro AUROC": found.get("macro", math.nan)}
    else:
        figures = {name: found.get(key, math.nan) for name, key in MULTICLASS_COLUMNS}
    if space.binary is not None:
        figures[f"{space.binary} (binary) AUROC"] = found.get("binary", math.nan)
    figures["ECE"] = metrics["calibration"][space.head]["ece"]
    return figures


MULTICLASS_COLUMNS = (("accuracy", "accuracy"), ("macro F1", "macro_f1"), ("macro AUROC", "macro_auroc"))


def figure_keys(space: LabelSpace) -> dict[str, str]:
    """``head_figures``' column titles -> the keys of their bootstrap intervals (``evaluate.uncertainty``)."""
    if space.multi_label:
        keys = {"macro AUROC": f"{space.head}_macro_auroc"}
    else:
        keys = {name: f"{space.head}_{key}" for name, key in MULTICLASS_COLUMNS}
    if space.binary is not None:
        keys[f"{space.binary} (binary) AUROC"] = binary_name(space)
    return keys | {"ECE": f"{space.head}_ece"}


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _with_interval(value: float, metrics: dict[str, Any], key: str) -> str:
    """The value, and its 95% interval where this system has one: ``0.825 [0.801, 0.846]``."""
    low, high = (metrics.get("intervals") or {}).get(key, (math.nan, math.nan))
    if value != value or low != low:
        return _fmt(value)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _panels(count: int, width: float, height: float):
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, axes[0]


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_roc(out: Path, systems: dict[str, dict[str, np.ndarray]], space: LabelSpace, index: int) -> str | None:
    """ROC curves of a head per class (one-vs-rest for a multi-class head), a panel per system."""
    fig, axes = _panels(len(systems), 4.2, 4)
    drawn = False
    for ax, (name, pred) in zip(axes, systems.items(), strict=True):
        rows = pred["source"] == index
        labels, probs = pred[label_key(space.head)][rows], pred[space.head][rows]
        for k, cls in enumerate(space.classes):
            target = labels[:, k] > 0.5 if space.multi_label else labels == k
            if 0 < target.sum() < len(target):
                fpr, tpr, _ = roc_curve(target, probs[:, k])
                ax.plot(fpr, tpr, lw=1, label=cls)
                drawn = True
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set_title(f"{name}: {space.head} ROC", fontsize=9)
        ax.set_xlabel("false positive rate")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel("true positive rate")
    axes[-1].legend(fontsize=6, loc="lower right")
    return _save(fig, out, f"roc_{space.head}.png")


def plot_reliability(out: Path, metrics: dict[str, Any], space: LabelSpace) -> str | None:
    """The head's reliability diagram, a line per system."""
    if not any(m["calibration"][space.head]["bins"] for m in metrics.values()):
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, m in metrics.items():
        cal = m["calibration"][space.head]
        ax.plot([b["confidence"] for b in cal["bins"]], [b["accuracy"] for b in cal["bins"]], "o-", ms=3,
                label=f"{name} (ECE {_fmt(cal['ece'])})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    if space.multi_label:
        xlabel, ylabel = "predicted probability (every class)", "observed frequency"
    else:
        xlabel, ylabel = "confidence (top-1 probability)", "accuracy"
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{space.head} head reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, out, f"reliability_{space.head}.png")


def plot_confusion(out: Path, metrics: dict[str, Any], space: LabelSpace) -> str | None:
    """A multi-class head's confusion matrix (rows: truth, columns: prediction), a panel per system."""
    if space.multi_label or not all(m["heads"].get(space.head) for m in metrics.values()):
        return None
    classes = space.classes
    fig, axes = _panels(len(metrics), 3.6, 3.4)
    for ax, (name, m) in zip(axes, metrics.items(), strict=True):
        matrix = np.array(m["heads"][space.head]["confusion"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{name}: {space.head}", fontsize=9)
    return _save(fig, out, f"confusion_{space.head}.png")


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


def describe_metadata(fusion: dict[str, bool]) -> list[str]:
    """A paragraph per model with the metadata fusion head: what its "without metadata" row is."""
    lines = []
    for role in (role for role, on in fusion.items() if on):
        lines += [
            "",
            f"**{role} without metadata**: the same {role.upper()} (it has the metadata fusion head, "
            f"`model.{role}.metadata`) on the same test rows with age, sex and view position hidden (every field "
            '"missing"); the gap to its own row is what the metadata adds. Only NIH rows carry metadata.',
        ]
    return lines


def describe_intervals(replicates: int, metrics: dict[str, Any]) -> list[str]:
    with_intervals = [name for name, m in metrics.items() if m.get("intervals")]
    if not replicates or not with_intervals:
        return ["Without confidence intervals (`evaluate.bootstrap_replicates: 0`)."]
    return [
        f"Brackets: 95% confidence intervals from {replicates} bootstrap replicates that resample patients within "
        f"each source (all images of a drawn patient), for {', '.join(with_intervals)}."
    ]


def summary_table(metrics: dict[str, Any], spaces: Sequence[LabelSpace]) -> list[str]:
    """system | score | each head's main figure (macro AUROC multi-label, macro F1 multi-class)."""
    header = ["system", "score"] + [f"{s.head} macro {'AUROC' if s.multi_label else 'F1'}" for s in spaces]
    rows = [[name] + [_with_interval(m["headline"][key], m, key) for key in ["score", *map(main_key, spaces)]]
            for name, m in metrics.items()]  # fmt: skip
    return table(header, rows)


def per_class_table(metrics: dict[str, Any], space: LabelSpace) -> list[str]:
    """Multi-label: AUROC per class. Multi-class: precision / recall / F1 / one-vs-rest AUROC per class."""
    rows = []
    for cls in space.classes:
        cells = [cls]
        for m in metrics.values():
            found = m["heads"].get(space.head)
            if not found:
                cells.append("n/a")
            elif space.multi_label:
                cells.append(_with_interval(found["per_finding"][cls], m, f"{space.head}/{cls}_auroc"))
            else:
                c = found["per_class"][cls]
                cells.append(f"{c['precision']:.2f} / {c['recall']:.2f} / {c['f1']:.2f} / "
                             f"{_fmt(found['auroc_per_class'][cls])}")  # fmt: skip
        rows.append(cells)
    return table(["class", *metrics], rows)


def head_section(
    out: Path, summary: dict[str, Any], systems: dict[str, dict[str, np.ndarray]], space: LabelSpace, index: int
) -> list[str]:
    """A head's section: what it is, its figures per system, its per-class table and its plots."""
    metrics = summary["systems"]
    count = (summary.get("test_images_per_head") or {}).get(space.head, 0)
    kind = "multi-label" if space.multi_label else "multi-class"
    lines = ["", f"## Head `{space.head}`", ""]
    lines.append(f"{kind} over {len(space.classes)} classes, trained and scored on the `{space.source}` images "
                 f"({count} in the test split).")  # fmt: skip
    if space.binary is not None:
        what = "any class" if space.multi_label else f"any class but {', '.join(space.negatives)}"
        lines.append(f"The binary answer *{space.binary}* is {what}.")
    figures = {name: head_figures(space, m) for name, m in metrics.items()}
    keys = figure_keys(space)
    rows = [[n, *(_with_interval(v, metrics[n], keys[c]) for c, v in f.items())] for n, f in figures.items()]
    lines += ["", *table(["system", *keys], rows)]
    title = "AUROC per class" if space.multi_label else "per class (precision / recall / F1 / AUROC)"
    lines += ["", f"### `{space.head}` {title}", "", *per_class_table(metrics, space)]
    plots = [plot_roc(out, systems, space, index), plot_reliability(out, metrics, space)]
    plots.append(plot_confusion(out, metrics, space))
    drawn = [p for p in plots if p]
    if drawn:
        lines += ["", *(f"![{p}]({p})" for p in drawn)]
    return lines


def plot_calibration(out: Path, scaling: dict[str, dict[str, dict[str, Any]]], head: str) -> str | None:
    """One head's reliability diagram per model before (dashed) and after (solid) its temperature."""
    if not any(heads[head]["bins_before"] for heads in scaling.values()):
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for role, heads in scaling.items():
        c = heads[head]
        for when, style in (("before", "--"), ("after", "-")):
            bins = c[f"bins_{when}"]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, marker="o", ms=3,
                    label=f"{role} {when} (ECE {_fmt(c[f'ece_{when}'])})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.set(xlabel="predicted", ylabel="observed", title=f"{head}: temperature scaling", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, out, f"calibration_{head}.png")


def calibration_section(out: Path, scaling: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Temperature scaling per role and head: T and the test split's ECE before and after it, and a reliability
    diagram per head with both."""
    if not scaling:
        return []
    fitted = any(c["temperature"] != 1.0 for heads in scaling.values() for c in heads.values())
    lines = ["", "## Calibration (temperature scaling)", ""]
    fitted_text = (
        "Each model's logits per head divided by a temperature fitted on the validation split by `cxr tune ensemble` "
        "(stored in ensemble.yaml); every figure above, the fusion and the gate use the calibrated probabilities. "
        "ECE on the test split:"
    )
    missing_text = "No temperatures in the ensemble settings (run `cxr tune ensemble`): probabilities as given."
    lines.append(fitted_text if fitted else missing_text)
    rows = [[role, head, f"{c['temperature']:.3f}", _fmt(c["ece_before"]), _fmt(c["ece_after"])]
            for role, heads in scaling.items() for head, c in heads.items()]  # fmt: skip
    lines += ["", *table(["model", "head", "temperature", "ECE before", "ECE after"], rows)]
    drawn = [plot_calibration(out, scaling, head) for head in next(iter(scaling.values()))] if fitted else []
    return lines + (["", *(f"![{p}]({p})" for p in drawn if p)] if any(drawn) else [])


def plot_risk_coverage(out: Path, heads: dict[str, Any]) -> str:
    """Each head's figure against the share of answers kept (most confident first), the floor's point marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for head, found in heads.items():
        curve = sorted(found["curve"].items())
        line = ax.plot([c for c, _ in curve], [v for _, v in curve], marker=".", label=f"{head} ({found['figure']})")
        at = found["at_floor"]
        ax.plot([at["coverage"]], [at["figure"]], "o", mfc="none", ms=9, color=line[0].get_color())
    ax.set(xlabel="coverage (share answered, most confident first)", ylabel="figure on the answered images")
    ax.set_title("risk-coverage (adaptive); circles: the referral floor", fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    return _save(fig, out, "risk_coverage.png")


def referral_section(out: Path, referral: dict[str, Any]) -> list[str]:
    """The adaptive ensemble's figure per head when only its most confident answers stand (``referral.py``): a table
    and the risk-coverage plot."""
    if not referral.get("heads"):
        return []
    floor = referral["refer_below"]
    lines = ["", "## Referral: coverage against quality (adaptive)", ""]
    lines.append(
        "Each head's answers on its own test images, most confident first: the figure on the share answered, the rest "
        f"referred. Serving refers answers below the floor {floor:.3f} from `cxr tune ensemble` (`refer_below`, for "
        "`tune.ensemble.refer_coverage` of the validation images); the last column is where it lands on this split."
    )
    coverages = list(next(iter(referral["heads"].values()))["points"])
    header = ["head", "figure", *(f"{c:.0%}" for c in coverages), "at the floor"]
    rows = []
    for head, found in referral["heads"].items():
        at = found["at_floor"]
        cells = [_fmt(found["points"][c]) for c in coverages]
        rows.append([head, found["figure"], *cells, f"{_fmt(at['figure'])} ({at['coverage']:.0%} answered)"])
    return lines + ["", *table(header, rows), "", f"![risk-coverage]({plot_risk_coverage(out, referral['heads'])})"]


def subgroup_section(found: dict[str, Any], system: str) -> list[str]:
    """``system``'s multi-label heads per subgroup (``subgroups.subgroup_metrics``): a table of groups, then every
    finding's worst and best group, largest gap first."""
    lines = ["", f"## Subgroups ({system})", ""]
    lines.append(
        f"Each multi-label head on its own test images by sex, age band and view position (groups of at least "
        f"{MIN_GROUP_IMAGES} images; a finding needs {MIN_POSITIVES} positives and negatives in the group). "
        f"**Flagged**: AUROC more than {FLAG_BELOW} below the head's overall figure. Small groups are noisy: weigh a "
        "flag against the intervals above."
    )
    for head, block in found.items():
        rows = [["all", "", _fmt(block["overall"]["macro"]), ""]]
        rows += [[name, str(g["images"]), _fmt(g["macro"]), ", ".join(g["flagged"]) or "-"]
                 for name, g in block["groups"].items()]  # fmt: skip
        lines += ["", f"### `{head}` by group", "", *table(["group", "images", "macro AUROC", "flagged"], rows)]
        gaps = sorted(block["findings"].items(), key=lambda item: -item[1]["gap"])
        if gaps:
            rows = [[finding, g["worst"], g["best"], f"{g['gap']:.3f}"] for finding, g in gaps]
            lines += ["", *table(["finding", "worst group", "best group", "AUROC gap"], rows)]
    return lines


def write_report(
    out: Path,
    summary: dict[str, Any],
    systems: dict[str, dict[str, np.ndarray]],
    spaces: Sequence[LabelSpace],
    explanation_grid: str | None = None,
) -> Path:
    """``report.md`` (and its plots) in ``out`` from the evaluation summary and each system's predictions."""
    metrics = summary["systems"]
    ens = summary["ensemble"]
    lines = [
        "# Evaluation on the test split",
        "",
        f"{summary['test_images']} test images; ensemble w_cnn={ens['w_cnn']:.3f}, threshold={ens['threshold']:.3f} "
        f"(from {ens.get('source', 'config')}); "
        f"test-time augmentation passes: {summary['tta_passes']}.",
        f"The adaptive gate sent **{metrics['adaptive']['vit_fraction']:.1%}** of the test images to the ViT "
        "(each image gated on its own source's head).",
        *describe_extras(summary.get("extras") or {}),
        *describe_metadata(summary.get("metadata_fusion") or {}),
        "",
        "## Summary",
        "",
        "The score is the mean over heads of each head's main figure: macro AUROC for a multi-label head, macro F1 "
        "for a multi-class one.",
        *describe_intervals(summary.get("bootstrap_replicates", 0), metrics),
        "",
        *summary_table(metrics, spaces),
    ]
    for index, space in enumerate(spaces):
        lines += head_section(out, summary, systems, space, index)
    lines += calibration_section(out, summary.get("temperature_scaling") or {})
    lines += referral_section(out, summary.get("referral") or {})
    lines += ood_section(summary.get("ood"))
    if summary.get("shortcut"):
        lines += report_section(summary["shortcut"])
    for system, found in (summary.get("subgroups") or {}).items():
        lines += subgroup_section(found, system)
    if explanation_grid:
        lines += [
            "",
            "## Where the models look (Grad-CAM)",
            "",
            "A few test images per class of every head, with each model's map of the true label "
            "(`models/explain.py`, as `POST /v1/explain` serves it).",
            "",
            f"![{explanation_grid}]({explanation_grid})",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
