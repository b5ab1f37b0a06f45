"""The evaluation report's Grad-CAM grid: a few test images per covid class and per nih14 finding, each drawn
with the CNN's and the ViT's map of that label (``models.explain``, the function serving uses too)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.explain import grad_cam, overlay  # noqa: E402
from models.labels import NIH14  # noqa: E402

GRID_FILE = "gradcam_grid.png"


def pick_examples(
    batches: Iterable[dict[str, np.ndarray]], classes: tuple[str, ...], per_class: int
) -> dict[tuple[str, str], list[np.ndarray]]:
    """(head, label) -> up to ``per_class`` test images [S, S] that carry the label, in split order."""
    found: dict[tuple[str, str], list[np.ndarray]] = {("covid", name): [] for name in classes}
    found.update({("nih14", name): [] for name in NIH14})
    for batch in batches:
        images, sources = np.asarray(batch["image"])[:, 0], np.asarray(batch["source"])
        nih_labels, covid_labels = np.asarray(batch["nih_labels"]), np.asarray(batch["covid_label"])
        for row, image in enumerate(images):
            if sources[row] == 1:
                keys = [("covid", classes[int(covid_labels[row])])]
            else:
                keys = [("nih14", NIH14[k]) for k in np.flatnonzero(nih_labels[row] > 0.5)]
            for key in keys:
                if len(found[key]) < per_class:
                    found[key].append(image)
        if all(len(images) == per_class for images in found.values()):
            break
    return {key: images for key, images in found.items() if images}


def plot_explanation_grid(
    out: Path, models: dict[str, object], examples: dict[tuple[str, str], list[np.ndarray]], classes: tuple[str, ...]
) -> str | None:
    """One row per label, one column per (image, model); each panel says the model's probability of the label."""
    if not examples:
        return None
    per_row = max(len(images) for images in examples.values())
    columns = per_row * len(models)
    fig, axes = plt.subplots(len(examples), columns, figsize=(1.6 * columns, 1.75 * len(examples)), squeeze=False)
    for row, ((head, label), images) in enumerate(examples.items()):
        index = classes.index(label) if head == "covid" else NIH14.index(label)
        for slot, (role, model) in enumerate(models.items()):
            maps = grad_cam(model, np.stack(images)[:, None], head, index)
            for number, (image, found) in enumerate(zip(images, maps, strict=True)):
                ax = axes[row, number * len(models) + slot]
                ax.imshow(overlay(image, found.cam))
                ax.set_title(f"{role} p={found.probability:.2f}", fontsize=7)
        axes[row, 0].set_ylabel(f"{head}\n{label}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle("Grad-CAM of the true label on test images (bright: raises that label's score)", fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(out / GRID_FILE, dpi=72)
    plt.close(fig)
    return GRID_FILE
