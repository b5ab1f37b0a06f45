"""The evaluation report's Grad-CAM grid: a few test images per class of every head (each image under its own
source's head), each drawn with the CNN's and the ViT's map of that label (``models.explain``, the function serving
uses too)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.explain import grad_cam, overlay  # noqa: E402
from models.labels import LabelSpace, by_head, label_key  # noqa: E402

GRID_FILE = "gradcam_grid.png"


def _row_labels(space: LabelSpace, labels: np.ndarray) -> list[str]:
    """The classes one row carries on its head: every present class (multi-label) or its one class."""
    if space.multi_label:
        return [space.classes[k] for k in np.flatnonzero(labels > 0.5)]
    return [space.classes[int(labels)]] if int(labels) >= 0 else []


def pick_examples(
    batches: Iterable[dict[str, np.ndarray]], spaces: Sequence[LabelSpace], per_class: int
) -> dict[tuple[str, str], list[np.ndarray]]:
    """(head, class) -> up to ``per_class`` test images [S, S] that carry the class, in split order; the batches'
    ``source`` indexes ``spaces``. Labels no test image carries are left out."""
    found: dict[tuple[str, str], list[np.ndarray]] = {
        (space.head, name): [] for space in spaces for name in space.classes
    }
    for batch in batches:
        images, sources = np.asarray(batch["image"])[:, 0], np.asarray(batch["source"])
        for row, image in enumerate(images):
            space = spaces[int(sources[row])]
            for name in _row_labels(space, np.asarray(batch[label_key(space.head)][row])):
                if len(found[space.head, name]) < per_class:
                    found[space.head, name].append(image)
        if all(len(images) == per_class for images in found.values()):
            break
    return {key: images for key, images in found.items() if images}


def plot_explanation_grid(
    out: Path,
    models: dict[str, object],
    examples: dict[tuple[str, str], list[np.ndarray]],
    spaces: Sequence[LabelSpace],
) -> str | None:
    """One row per label, one column per (image, model); each panel says the model's probability of the label."""
    if not examples:
        return None
    heads = by_head(spaces)
    per_row = max(len(images) for images in examples.values())
    columns = per_row * len(models)
    fig, axes = plt.subplots(len(examples), columns, figsize=(1.6 * columns, 1.75 * len(examples)), squeeze=False)
    for row, ((head, label), images) in enumerate(examples.items()):
        index = heads[head].class_index(label)
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
