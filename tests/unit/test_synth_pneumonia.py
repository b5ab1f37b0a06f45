"""The synthetic Kermany pneumonia set: the real layout and names, planned counts, patients, JPEG modes and sizes,
determinism, overwrite safety and its config keys. No Ray; one small set (32 images) is written per module."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import ConfigError, SynthConfig, load_config
from pipelines.data.datasets.pneumonia import CLASSES, list_pneumonia, parse_file_name
from pipelines.data.imaging import decode_gray
from pipelines.data.synth import MANIFEST_NAME, labels_sampler, synthesize
from pipelines.data.synth.__main__ import main
from pipelines.data.synth.kermany import plan_pneumonia, pneumonia_pixels
from pipelines.data.synth.runner import Target
from tests.helpers import ROOT

COUNTS = {
    "train": {"normal": 6, "bacterial": 8, "viral": 5},
    "val": {"normal": 2, "bacterial": 2, "viral": 0},
    "test": {"normal": 3, "bacterial": 3, "viral": 3},
}
SMALL = [
    "data.synth.seed=5",
    "data.synth.nih_patients=2",
    "data.synth.max_images_per_patient=1",
    "data.synth.nih_image_size=32",
    "data.synth.covid_images=4",
    "data.synth.covid_image_size=32",
    "data.synth.pneumonia_class_counts=" + json.dumps(COUNTS),
    "data.synth.pneumonia_image_size=[48, 96]",
    "data.synth.pneumonia_rgb_fraction=0.3",
]


def small_config(*extra: str):
    return load_config(None, sets=[*SMALL, *extra])


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpeg")
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_pneumonia")
    manifest = synthesize(small_config(), root / "nih", root / "covid", workers=1)
    return root, manifest


def test_the_reader_lists_the_planned_counts_without_rejects(written):
    root, manifest = written
    listing = list_pneumonia(root / "pneumonia")  # beside the NIH folder when only --nih is given
    assert not listing.rejects and len(listing.rows) == 32
    found = Counter((row["relpath"].split("/")[0], CLASSES[row["labels"][0]]) for row in listing.rows)
    assert found == Counter({(s, c): n for s, classes in COUNTS.items() for c, n in classes.items() if n})
    assert manifest["pneumonia"]["splits"] == COUNTS and manifest["pneumonia"]["dir"] == "pneumonia"
    assert json.loads((root / MANIFEST_NAME).read_text())["pneumonia"] == manifest["pneumonia"]
    for split in COUNTS:  # every split and class folder exists, as in the real set (val/PNEUMONIA too)
        assert {p.name for p in (root / "pneumonia" / "chest_xray" / split).iterdir()} == {"NORMAL", "PNEUMONIA"}


def test_names_parse_to_the_planned_patients_and_classes(written):
    root, manifest = written
    plan = plan_pneumonia(small_config().data.synth)
    pairs = set()
    for img in plan:
        folder = img.relpath.split("/")[2]
        patient, label = parse_file_name(img.name, folder)
        assert CLASSES[label] == img.cls and (root / "pneumonia" / img.relpath).is_file()
        pairs.add((patient, img.patient))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == manifest["pneumonia"]["patients"]


def test_jpegs_decode_with_mixed_modes_and_sizes(written):
    root, _ = written
    modes, sizes = Counter(), set()
    for img in plan_pneumonia(small_config().data.synth):
        data = (root / "pneumonia" / img.relpath).read_bytes()
        pixels, _ = decode_gray(data)
        assert pixels.shape == (img.height, img.width) and img.height != img.width
        assert 48 <= max(pixels.shape) <= 96 and 20 < pixels.mean() < 235
        with Image.open(root / "pneumonia" / img.relpath) as image:
            assert image.format == "JPEG"
            modes[image.mode] += 1
        sizes.add(pixels.shape)
    assert set(modes) == {"L", "RGB"} and len(sizes) > 10


def test_same_seed_same_bytes_whatever_the_workers(written, tmp_path):
    root, _ = written
    synthesize(small_config(), tmp_path / "nih", tmp_path / "covid", workers=2, pneumonia_dir=tmp_path / "p")
    first = file_hashes(root / "pneumonia")
    assert len(first) == 32 and first == file_hashes(tmp_path / "p")


def test_the_real_counts_patients_and_names_of_the_scale_profile():
    synth = load_config(ROOT / "ray_config.yaml", "scale").data.synth
    assert synth.pneumonia_class_counts.model_dump() == labels_sampler.PNEUMONIA_REAL_COUNTS
    plan = plan_pneumonia(synth)  # planning only: no pixels
    assert len(plan) == 5856
    split_of, kinds = {}, defaultdict(set)
    for img in plan:
        assert split_of.setdefault(img.patient, img.split) == img.split  # no patient crosses a split
        kinds[img.patient].add(img.cls)
    per_patient = Counter(img.patient for img in plan)
    sick = [p for p in per_patient if kinds[p] != {"normal"}]
    assert max(per_patient[p] for p in sick) > 3 and 1.5 < np.mean([per_patient[p] for p in sick]) < 3
    assert sum(kinds[p] == {"bacterial", "viral"} for p in sick) > 20  # both kinds, as in the real set
    names = [img.name for img in plan]
    assert len(set(names)) == len(names)
    assert {n.split("-")[0] for n in names if not n.startswith("person")} == {"IM", "NORMAL2"}
    assert any(n.count("-") == 4 for n in names)  # NORMAL2-IM-<NNNN>-0001-<K>
    demo = load_config(ROOT / "ray_config.yaml", "demo").data.synth
    assert 100 <= len(plan_pneumonia(demo)) <= 600


def test_total_follows_the_real_proportions_and_pool_renders_each_size():
    counts = labels_sampler.pneumonia_split_counts(300)
    assert sum(sum(c.values()) for c in counts.values()) == 300 and counts["val"]["viral"] == 0
    assert counts["val"]["normal"] >= 1 and counts["train"]["bacterial"] > counts["train"]["viral"]
    plan = plan_pneumonia(SynthConfig(pneumonia_images=8, pneumonia_image_size=(40, 64)))
    target = Target(0, Path("."), 64, pool=2)
    pixels = [pneumonia_pixels(img, target) for img in plan]
    assert [p.shape for p in pixels] == [(img.height, img.width) for img in plan]
    corners = [p[:20, :20] for p in pixels]  # every file differs from the next, even from one base render
    assert min(float(np.abs(a - b).mean()) for a, b in zip(corners, corners[1:], strict=False)) > 0


def test_overwrite_only_replaces_what_synth_wrote(tmp_path, capsys):
    args = [f"--set={s}" for s in SMALL] + ["--set=data.synth.pneumonia_class_counts=null"]
    args += ["--set=data.synth.pneumonia_images=8", "--set=data.synth.pneumonia_image_size=[32, 40]"]
    args += ["--nih", str(tmp_path / "n"), "--covid", str(tmp_path / "c"), "--pneumonia", str(tmp_path / "k")]
    assert main([*args, "--workers", "1"]) == 0
    assert "PNEUMONIA 8 images" in capsys.readouterr().out
    assert len(list_pneumonia(tmp_path / "k").rows) == 8
    assert main([*args, "--workers", "1"]) == 2  # not empty, no --overwrite
    stale = tmp_path / "k" / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    stale.write_bytes(b"old")
    assert main([*args, "--workers", "1", "--overwrite"]) == 0 and not stale.exists()
    (tmp_path / "k" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        synthesize(small_config(), tmp_path / "n", tmp_path / "c", overwrite=True, pneumonia_dir=tmp_path / "k")
    assert (tmp_path / "k" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("data.synth.pneumonia_images=5", "data.synth.pneumonia_images"),
        ("data.synth.pneumonia_images=-1", "data.synth.pneumonia_images"),
        ("data.synth.pneumonia_image_size=[96, 48]", "data.synth.pneumonia_image_size"),
        ("data.synth.pneumonia_image_size=[16, 48]", "data.synth.pneumonia_image_size"),
        ("data.synth.pneumonia_rgb_fraction=1.5", "data.synth.pneumonia_rgb_fraction"),
        ("data.synth.pneumonia_class_counts.train.normal=-2", "data.synth.pneumonia_class_counts.train.normal"),
        ("data.synth.pneumonia_class_counts.test.covid=2", "data.synth.pneumonia_class_counts.test.covid"),
        ("data.synth.pneumonia_class_counts.test.viral=0", "data.synth.pneumonia_class_counts"),
        ("data.pneumonia_dir=[1]", "data.pneumonia_dir"),
    ],
)
def test_bad_pneumonia_settings_name_their_key(override, dotted):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets=[*SMALL, override])
    assert f"{dotted}:" in str(err.value)


def test_the_pneumonia_folder_follows_the_nih_folder_unless_set():
    assert load_config(None).data.pneumonia_root == Path("runs/data/pneumonia")
    demo = load_config(ROOT / "ray_config.yaml", "demo")
    assert demo.data.pneumonia_dir is None and demo.data.pneumonia_root == Path("runs/demo/data/pneumonia")
    absolute = demo.with_absolute_paths().data
    assert absolute.pneumonia_root.is_absolute() and absolute.pneumonia_root.parent == absolute.nih_dir.parent
    assert load_config(None, sets=["data.nih_dir=/x/nih"]).data.pneumonia_root == Path("/x/pneumonia")
    chosen = load_config(None, sets=["data.nih_dir=/x/nih", "data.pneumonia_dir=/y/kermany"])
    assert chosen.data.pneumonia_root == chosen.with_absolute_paths().data.pneumonia_root == Path("/y/kermany")


def test_missing_split_is_named():
    with pytest.raises(ConfigError, match=r"data\.synth\.pneumonia_class_counts\.val:"):
        load_config(None, sets=["data.synth.pneumonia_class_counts=" + json.dumps({"train": COUNTS["train"]})])
