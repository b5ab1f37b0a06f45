"""Grad-CAM (models/explain.py): maps on the right grid for the right label, and on the lesion for a trained model.

No Ray. The last test trains the demo profile's CNN (architecture, input size, learning rate and batch size of
``--profile demo``) for a few epochs on synthetic radiographs with and without a planted nodule, then checks that
the map of *Nodule* puts clearly more of its mass on the nodule than the nodule's share of the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.explain import (
    FINAL_STAGE,
    MIN_GRID,
    cnn_layer,
    fuse_maps,
    grad_cam,
    mass_over,
    overlay,
    upsample,
)
from models.factory import build_model
from models.labels import label_key
from pipelines.data.datasets.nih import NIH14
from pipelines.data.datasets.pneumonia import CLASSES as PNEUMONIA_CLASSES
from tests.helpers import SPACES

DEMO_VIT_OPTIONS = {"global_pool": "avg", "class_token": False}


def images(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (count, 1, size, size), dtype=np.uint8)


@pytest.mark.parametrize(
    ("arch", "options", "grid"),
    [("test_efficientnet", {}, 8), ("test_vit", {}, 4), ("test_vit", DEMO_VIT_OPTIONS, 4)],
)
def test_maps_are_on_the_layer_grid_and_probabilities_are_the_models(arch, options, grid):
    model = build_model(arch, 64, SPACES, options=options).eval()
    batch = images(3)
    found = grad_cam(model, batch, "nih14", NIH14.index("Effusion"))
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch))
    expected = torch.sigmoid(logits["nih14"][:, NIH14.index("Effusion")]).numpy()
    assert [item.cam.shape for item in found] == [(grid, grid)] * 3
    np.testing.assert_allclose([item.probability for item in found], expected, atol=1e-5)
    for item in found:
        assert item.cam.dtype == np.float32 and item.cam.min() >= 0.0 and item.cam.max() == pytest.approx(1.0)
    covid = grad_cam(model, batch[:1], "covid", 2)[0]
    assert covid.probability == pytest.approx(float(torch.softmax(logits["covid"][0], -1)[2]), abs=1e-5)


def test_any_head_of_the_model_is_explained_with_its_own_probabilities():
    """The third head (pneumonia, multi-class): softmax over its own classes, a map for each class."""
    model = build_model("test_efficientnet", 64, SPACES).eval()
    batch = images(2, seed=3)
    viral = PNEUMONIA_CLASSES.index("viral")
    found = grad_cam(model, batch, "pneumonia", viral)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(batch))["pneumonia"], -1)[:, viral].numpy()
    np.testing.assert_allclose([item.probability for item in found], expected, atol=1e-5)
    assert all(item.cam.max() == pytest.approx(1.0) for item in found)
    with pytest.raises(ValueError, match="not a class index of head 'pneumonia'"):
        grad_cam(model, batch, "pneumonia", len(PNEUMONIA_CLASSES))


def test_each_image_of_a_batch_gets_its_own_map():
    model = build_model("test_efficientnet", 64, SPACES).eval()
    batch = images(4, seed=1)
    together = grad_cam(model, batch, "nih14", 0)
    for index in range(4):
        alone = grad_cam(model, batch[index : index + 1], "nih14", 0)[0]
        np.testing.assert_allclose(alone.cam, together[index].cam, atol=1e-4)


def test_the_map_depends_on_the_label_asked_for():
    model = build_model("test_efficientnet", 64, SPACES).eval()
    batch = images(1, seed=2)
    maps = [grad_cam(model, batch, "nih14", index)[0].cam for index in range(4)]
    assert any(not np.allclose(maps[0], other, atol=1e-3) for other in maps[1:])


def test_cnn_layer_is_the_last_stage_unless_it_is_too_coarse():
    full = build_model("efficientnet_b0", 224, SPACES)
    assert cnn_layer(full) == FINAL_STAGE  # 7x7 at 224 px: classic Grad-CAM
    assert grad_cam(full, images(1, 224), "nih14", 0)[0].cam.shape == (7, 7)
    demo = build_model("test_efficientnet", 64, SPACES)  # its last stage is 2x2 at 64 px
    layer = cnn_layer(demo)
    assert (
        layer != FINAL_STAGE
        and 64 // dict((i["module"], i["reduction"]) for i in demo.backbone.feature_info)[layer] >= MIN_GRID
    )


def test_unknown_head_is_refused_naming_the_models_heads():
    with pytest.raises(ValueError, match="head must be one of nih14, covid, pneumonia, got 'chexpert'"):
        grad_cam(build_model("test_efficientnet", 64, SPACES), images(1), "chexpert", 0)


def test_training_mode_is_restored():
    model = build_model("test_efficientnet", 64, SPACES).train()
    grad_cam(model, images(1), "nih14", 0)
    assert model.training


def test_overlay_leaves_cold_regions_as_they_were():
    gray = np.full((32, 32), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0
    drawn = overlay(gray, cam)
    assert drawn.shape == (32, 32, 3) and drawn.dtype == np.uint8
    assert (drawn[-8:, -8:] == 100).all()  # zero heat: the radiograph unchanged
    assert not (drawn[0, 0] == 100).all()


def test_fuse_maps_weights_the_finer_grid_and_mass_over_counts_the_mask():
    cnn, vit = np.zeros((2, 2), np.float32), np.zeros((4, 4), np.float32)
    cnn[0, 0], vit[3, 3] = 1.0, 1.0
    fused = fuse_maps(cnn, vit, w_cnn=0.25)
    assert fused.shape == (4, 4) and fused.max() == pytest.approx(1.0)
    assert fused[3, 3] > fused[0, 0] > 0  # the ViT weighs 0.75
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    assert mass_over(np.ones((2, 2), np.float32), mask) == pytest.approx(0.25)
    assert upsample(np.ones((2, 2), np.float32), 8).shape == (8, 8)


# ------------------------------------------------------------------------ a trained demo model on a planted lesion


def nodule_dataset(count: int, first: int, storage_size: int, image_size: int):
    """Synthetic NIH radiographs, even indices with a nodule; the nodule's mask is the pixels it changed."""
    from pipelines.data.imaging import resize_square
    from pipelines.data.synth.render import render_image

    xs, masks = [], []
    for index in range(first, first + count):
        with_nodule = index % 2 == 0
        image = render_image(11, "nih", index, index, ["Nodule"] if with_nodule else [], image_size)
        xs.append(resize_square((image * 255).astype(np.uint8), storage_size))
        if with_nodule:
            diff = np.abs(image - render_image(11, "nih", index, index, [], image_size))
            masks.append(resize_square((diff > 0.25 * diff.max()).astype(np.uint8) * 255, storage_size) > 127)
        else:
            masks.append(None)
    labels = np.zeros((count, len(NIH14)), np.float32)
    labels[[i for i in range(count) if (first + i) % 2 == 0], NIH14.index("Nodule")] = 1.0
    return np.stack(xs)[:, None], labels, masks


def train_demo_cnn(x: np.ndarray, labels: np.ndarray, epochs: int):
    from pipelines.config import load_config
    from pipelines.train.steps import train_epoch, warmup_cosine

    cfg = load_config(profile="demo")
    torch.manual_seed(0)
    model = build_model(cfg.model.cnn.name, cfg.model.input_size, SPACES, mean=cfg.model.mean, std=cfg.model.std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    size = cfg.train.batch_size
    steps = epochs * -(-len(x) // size)
    scheduler = warmup_cosine(optimizer, steps // 10, steps)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        batches = [
            {
                "image": torch.from_numpy(x[chunk]),
                "source": torch.zeros(len(chunk), dtype=torch.long),  # NIH (head 0): the other heads are masked out
                label_key("nih14"): torch.from_numpy(labels[chunk]),
                **{
                    label_key(space.head): torch.full((len(chunk),), -1, dtype=torch.long)
                    for space in SPACES
                    if not space.multi_label
                },
            }
            for chunk in np.array_split(order, -(-len(x) // size))
        ]
        train_epoch(model, batches, optimizer, scheduler, torch.device("cpu"))
    return model.eval(), cfg


@pytest.mark.slow
def test_trained_demo_cnn_looks_at_the_planted_nodule():
    from pipelines.config import load_config

    demo = load_config(profile="demo")
    storage, rendered = demo.data.storage_size, demo.data.synth.nih_image_size
    x, labels, _ = nodule_dataset(640, 0, storage, rendered)
    model, cfg = train_demo_cnn(x, labels, epochs=8)
    assert cfg.model.input_size == storage  # the demo trains at its storage size: no second resize here

    test_x, test_labels, masks = nodule_dataset(40, 10_000, storage, rendered)
    nodule = NIH14.index("Nodule")
    found = grad_cam(model, test_x, "nih14", nodule)
    probs = np.array([item.probability for item in found])
    positive = test_labels[:, nodule] == 1
    assert probs[positive].mean() > 0.6 > 0.2 > probs[~positive].mean()  # the model learned the finding
    ratios = [
        mass_over(item.cam, mask) / mask.mean() for item, mask in zip(found, masks, strict=True) if mask is not None
    ]
    share = np.mean([mask.mean() for mask in masks if mask is not None])
    print(f"nodule area {share:.2%} of the image; map mass over it / area share: median {np.median(ratios):.2f}")
    assert np.median(ratios) >= 2.0  # measured ~2.9: a uniform map scores 1
    assert np.mean(np.array(ratios) > 1.0) >= 0.8
