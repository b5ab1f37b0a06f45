"""``data.synth.source_marker``: off, the synthetic files are byte for byte those of before the switch existed; on,
each source's images carry a bright tag in a corner of their own and differ from the unmarked ones only there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.config import load_config
from pipelines.data.synth import MANIFEST_NAME, synthesize
from pipelines.data.synth.__main__ import main
from pipelines.data.synth.render import MARKERS, burn_marker, marker_box, render_image
from tests.helpers import ROOT

SETS = [
    "data.synth.seed=5",
    "data.synth.nih_patients=6",
    "data.synth.max_images_per_patient=2",
    "data.synth.nih_image_size=48",
    "data.synth.covid_images=8",
    "data.synth.covid_image_size=40",
    "data.synth.odd_mode_fraction=0.3",
    "data.synth.near_duplicates=1",
    "data.synth.pneumonia_images=8",
    "data.synth.pneumonia_image_size=[40,56]",
]
# sha256 over (relative path, bytes) of every file of SETS, written by the code before source_marker existed
UNMARKED_DIGEST = "469c0c94847f47e900aaaab2dc0d0cd449b03b876bfc3888ed60181100614167"
FOLDERS = {"nih": "nih", "covid": "covid", "pneumonia": "pn"}
# the marked comparison at sizes where the tag is more than a smudge (at 48 px it is 5 px tall)
LARGER = ["data.synth.nih_image_size=96", "data.synth.covid_image_size=96", "data.synth.pneumonia_image_size=[96,128]"]


def _write(root: Path, *extra: str) -> Path:
    cfg = load_config(None, sets=[*SETS, *extra])
    synthesize(cfg, root / "nih", root / "covid", workers=1, pneumonia_dir=root / "pn")
    return root


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for folder in FOLDERS.values():
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    plain = _write(tmp_path_factory.mktemp("plain"), *LARGER)
    marked = _write(tmp_path_factory.mktemp("marked"), *LARGER, "data.synth.source_marker=true")
    return plain, marked


def _gray(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path)).astype(np.float64)
    if pixels.ndim == 3:  # RGB / RGBA copies of a gray image: the first channel is the gray value
        pixels = pixels[..., 0]
    return pixels / (65535.0 if pixels.max() > 255 else 255.0)


def test_marker_off_writes_the_same_bytes_as_before(tmp_path):
    assert load_config(None, sets=SETS).data.synth.source_marker is False
    assert _digest(_write(tmp_path)) == UNMARKED_DIGEST
    other = tmp_path / "explicit"
    other.mkdir()
    assert _digest(_write(other, "data.synth.source_marker=false")) == UNMARKED_DIGEST


def test_marker_on_changes_only_the_images_and_only_in_their_sources_corner(pair):
    plain, marked = pair
    duplicates = {d["covid"] for d in json.loads((marked / MANIFEST_NAME).read_text())["duplicates"]}
    for source, folder in FOLDERS.items():
        files = sorted(p.relative_to(plain / folder) for p in (plain / folder).rglob("*") if p.is_file())
        images = [f for f in files if f.suffix in (".png", ".jpeg") and f.as_posix() not in duplicates]
        assert images, source
        for name in set(files) - set(images):  # tables and lists do not change
            if name.as_posix() not in duplicates:
                assert (plain / folder / name).read_bytes() == (marked / folder / name).read_bytes()
        for name in images:
            before, after = _gray(plain / folder / name), _gray(marked / folder / name)
            y0, y1, x0, x1 = marker_box(before.shape, source)
            inside = np.zeros(before.shape, bool)
            inside[y0:y1, x0:x1] = True
            change = np.abs(after - before)
            assert after[inside].max() > 0.9, (source, name)  # a bright tag is there
            assert (change[inside] > 0.1).sum() >= 10, (source, name)
            if name.suffix == ".png":  # lossless: nothing moved outside the tag's box
                assert change[~inside].max() == 0, (source, name)
            else:  # JPEG: only the codec's ripple around the tag
                assert change[~inside].mean() < 0.02, (source, name)


def test_tags_differ_per_source_sit_apart_and_are_deterministic():
    pixels = render_image(0, "nih", 1, 1, (), 128)
    boxes = {source: marker_box(pixels.shape, source) for source in MARKERS}
    for a in MARKERS:
        for b in MARKERS:
            if a < b:  # the boxes do not overlap
                (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = boxes[a], boxes[b]
                assert ay1 <= by0 or by1 <= ay0 or ax1 <= bx0 or bx1 <= ax0, (a, b)
    marked = {source: burn_marker(pixels, source) for source in MARKERS}
    assert np.array_equal(marked["nih"], burn_marker(pixels, "nih"))
    assert marked["nih"].dtype == np.float32 and np.array_equal(pixels, render_image(0, "nih", 1, 1, (), 128))
    for source, image in marked.items():
        small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)  # as ingest stores the demo
        y0, y1, x0, x1 = (v // 2 for v in boxes[source])
        plain_small = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_AREA)
        assert (small[y0:y1, x0:x1] - plain_small[y0:y1, x0:x1]).max() > 0.4, source  # survives 64 px


def test_cli_switch_reaches_the_files_and_the_summary(tmp_path, capsys):
    args = ["--config", str(ROOT / "ray_config.yaml"), "--workers", "1", "--nih", str(tmp_path / "n")]
    args += ["--covid", str(tmp_path / "c"), "--pneumonia", str(tmp_path / "p")]
    args += [f"--set={s}" for s in SETS] + ["--set=data.synth.source_marker=true"]
    assert main(args) == 0
    assert "source markers" in capsys.readouterr().out
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["synth"]["source_marker"] is True
    first = sorted((tmp_path / "c").rglob("*.png"))[0]
    pixels = _gray(first)
    y0, y1, x0, x1 = marker_box(pixels.shape, "covid")
    assert pixels[y0:y1, x0:x1].max() > 0.85  # the COVID tag, top right
