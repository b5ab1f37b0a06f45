"""The ensemble sweep's picture: validation quality against the fraction of images the gate sends to the ViT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from models.labels import LabelSpace  # noqa: E402
from pipelines.config import EnsembleTuneConfig  # noqa: E402
from tune.objective import quality_label  # noqa: E402


def plot_tradeoff(
    frame: pd.DataFrame,
    chosen: pd.Series,
    references: dict[str, dict[str, Any]],
    settings: EnsembleTuneConfig,
    path: Path,
    spaces: Sequence[LabelSpace],
) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    points = ax.scatter(
        frame["vit_fraction"], frame["quality"], c=frame["w_cnn"], cmap="viridis", s=14, alpha=0.75, vmin=0, vmax=1
    )
    fig.colorbar(points, ax=ax, label="w_cnn (CNN's fusion weight)")
    for name, marker in (("cnn_only", "s"), ("always_ensemble", "D")):
        ref = references[name]
        ax.scatter(ref["vit_fraction"], ref["quality"], marker=marker, s=50, c="none", edgecolors="black", label=name)
    ax.scatter(
        chosen["vit_fraction"], chosen["quality"], marker="*", s=220, c="red", edgecolors="black",
        label=f"chosen: w_cnn {chosen['w_cnn']:.2f}, threshold {chosen['threshold']:.2f}",
    )  # fmt: skip
    if settings.objective == "constrained":
        ax.axvline(settings.max_vit_fraction, color="grey", linestyle="--", linewidth=1, label="max ViT fraction")
    ax.set_xlabel("fraction of images sent to the ViT (validation)")
    ax.set_ylabel("quality (validation)")
    # the quality's formula under the title: it names every head, too long for the axis label
    formula = quality_label(spaces, settings.head_weights)
    ax.set_title(f"Adaptive ensemble: quality against ViT cost\nquality: {formula}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
