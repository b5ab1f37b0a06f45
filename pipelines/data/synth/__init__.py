"""Synthetic chest radiographs written in the exact on-disk layouts of NIH ChestX-ray14, the COVID-19
Radiography Database and Kermany's pediatric pneumonia set, so that every later stage runs on data the project
generates itself.

``synthesize(cfg)`` plans patients, labels, splits and plants (``plan``, ``kermany``), renders each image from its
own seeded generator (``render``: ``anatomy`` + ``findings`` / ``covid_findings`` / ``pneumonia_findings``) in a
process pool (``runner``), writes the label CSV and split lists (``layouts``), and records counts and the ground
truth of the planted duplicates and corrupt files in ``synth_manifest.json`` beside the NIH folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.config import Config, SynthConfig
from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.datasets.nih import NIH14, NO_FINDING
from pipelines.data.synth import kermany, layouts
from pipelines.data.synth.kermany import PneumoniaImage
from pipelines.data.synth.plan import CovidImage, NihImage, Plan, make_plan
from pipelines.data.synth.pool import base_key
from pipelines.data.synth.runner import Runner, Target, write_covid_image, write_nih_image

log = logging.getLogger(__name__)

__all__ = ["synthesize", "target_dirs", "MANIFEST_NAME"]
MANIFEST_NAME = layouts.MANIFEST_NAME
_NIH_ENTRIES = re.compile(r"^(images_\d{3}|Data_Entry_2017_v2020\.csv|train_val_list\.txt|test_list\.txt)$")
_COVID_ENTRIES = re.compile(rf"^{re.escape(layouts.COVID_DATASET_FOLDER)}$")
_PNEUMONIA_ENTRIES = re.compile(rf"^{re.escape(layouts.PNEUMONIA_DATASET_FOLDER)}$")


def _prepare(folders: list[tuple[Path, re.Pattern[str]]], overwrite: bool) -> None:
    """Create the folders; refuse a non-empty one unless ``overwrite``, and then only if it holds only our files
    (``ours`` matches every top-level name synth writes there). All are checked before any is removed."""
    stale = []
    for folder, ours in folders:
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if entries and not overwrite:
            raise FileExistsError(f"{folder} is not empty; pass overwrite=True (--overwrite) to replace it")
        foreign = [name for name in entries if not ours.match(name)]
        if foreign:
            raise FileExistsError(
                f"{folder} holds files cxr synth did not write ({', '.join(foreign[:5])}); not removing it"
            )
        stale += [folder] if entries else []
    for folder in stale:
        log.info("removing the previous contents of %s", folder)
        shutil.rmtree(folder)
    for folder, _ in folders:
        folder.mkdir(parents=True, exist_ok=True)


def _render_order(images: list, synth: SynthConfig) -> list:
    """With a render pool, images that share a base render go to the same worker chunk (the files do not change)."""
    if not synth.render_pool:
        return images

    def key(img: NihImage | CovidImage | PneumoniaImage) -> tuple:
        if isinstance(img, PneumoniaImage):
            source, labels = kermany.SOURCE, img.findings
        else:
            source, labels = ("nih", img.findings) if isinstance(img, NihImage) else ("covid", (img.cls,))
        return base_key(synth.seed, source, img.index, labels, synth.render_pool)

    return sorted(images, key=key)


def _write_nih_tables(plan: Plan, root: Path) -> None:
    listed = [img for img in plan.nih if img.plant != "not_in_csv"]
    layouts.write_nih_csv(root / layouts.NIH_CSV_NAME, (img.csv_row() for img in listed))
    layouts.write_name_list(root / layouts.NIH_TRAIN_VAL_LIST, (img.name for img in listed if not img.test))
    layouts.write_name_list(root / layouts.NIH_TEST_LIST, (img.name for img in listed if img.test))


def _pneumonia_manifest(images: list[PneumoniaImage], folder: Path, base: Path, synth: SynthConfig) -> dict | None:
    if not images:
        return None
    return {
        "dir": os.path.relpath(folder, base),
        "images": len(images),
        "patients": len({img.patient for img in images}),
        "image_size": list(synth.pneumonia_image_size),
        "splits": {
            split: {cls: sum(img.split == split and img.cls == cls for img in images) for cls in counts}
            for split, counts in kermany.class_counts(synth).items()
        },
        "modes": dict(sorted(Counter(img.mode for img in images).items())),
    }


def _manifest(
    cfg: Config, plan: Plan, pneumonia: list[PneumoniaImage], nih_dir: Path, covid_dir: Path, pneumonia_dir: Path
) -> dict[str, Any]:
    synth = cfg.data.synth
    listed = [img for img in plan.nih if img.plant != "not_in_csv"]
    findings = Counter(name for img in listed for name in img.findings)
    base = nih_dir.parent
    return {
        "seed": synth.seed,
        "synth": synth.model_dump(mode="json"),
        "nih": {
            "dir": os.path.relpath(nih_dir, base),
            "images": len(listed),
            "patients": len({img.patient for img in listed}),
            "test_images": sum(img.test for img in listed),
            "train_val_images": sum(not img.test for img in listed),
            "test_patients": len({img.patient for img in listed if img.test}),
            "archives": max((img.archive for img in listed), default=0),
            "image_size": synth.nih_image_size,
            "findings": {name: findings.get(name, 0) for name in NIH14}
            | {NO_FINDING: sum(not img.findings for img in listed)},
            "modes": dict(sorted(Counter(img.mode for img in listed).items())),
        },
        "covid": {
            "dir": os.path.relpath(covid_dir, base),
            "images": len(plan.covid),
            "image_size": synth.covid_image_size,
            "classes": {cls: sum(c.cls == cls for c in plan.covid) for cls in COVID_CLASSES},
            "modes": dict(sorted(Counter(c.mode for c in plan.covid).items())),
        },
        "pneumonia": _pneumonia_manifest(pneumonia, pneumonia_dir, base, synth),
        "duplicates": plan.duplicates,
        "corrupt": plan.corrupt,
    }


def target_dirs(
    cfg: Config, nih_dir: Path | None = None, covid_dir: Path | None = None, pneumonia_dir: Path | None = None
) -> tuple[Path, Path, Path]:
    """The NIH, COVID and pneumonia folders: the given ones, else ``cfg.data.*_dir``; with ``data.pneumonia_dir``
    null (the default) the pneumonia set goes beside the NIH folder in use, as the manifest does."""
    nih = Path(nih_dir if nih_dir is not None else cfg.data.nih_dir)
    covid = Path(covid_dir if covid_dir is not None else cfg.data.covid_dir)
    if pneumonia_dir is None:
        pneumonia_dir = cfg.data.pneumonia_dir if cfg.data.pneumonia_dir is not None else nih.parent / "pneumonia"
    return nih, covid, Path(pneumonia_dir)


def _check_apart(folders: dict[str, Path]) -> None:
    named = [(name, folder, folder.resolve()) for name, folder in folders.items()]
    for i, (name_a, folder_a, a) in enumerate(named):
        for name_b, folder_b, b in named[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                raise FileExistsError(
                    f"the {name_a} folder {folder_a} and the {name_b} folder {folder_b} must not overlap"
                )


def synthesize(
    cfg: Config,
    nih_dir: Path | None = None,
    covid_dir: Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    pneumonia_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the synthetic NIH, COVID and (when configured) pneumonia datasets of ``cfg.data.synth``; returns the
    manifest dict.

    Folders as ``target_dirs`` resolves them. A non-empty target folder raises ``FileExistsError`` unless
    ``overwrite``, and even then one holding anything synth does not write. ``workers`` processes render (default:
    all cores); the files are byte-identical whatever the number.
    """
    synth = cfg.data.synth
    nih_dir, covid_dir, pneumonia_dir = target_dirs(cfg, nih_dir, covid_dir, pneumonia_dir)
    pneumonia = kermany.plan_pneumonia(synth)
    folders = [("NIH", nih_dir, _NIH_ENTRIES), ("COVID", covid_dir, _COVID_ENTRIES)]
    folders += [("pneumonia", pneumonia_dir, _PNEUMONIA_ENTRIES)] if pneumonia else []
    _check_apart({name: folder for name, folder, _ in folders})
    _prepare([(folder, ours) for _, folder, ours in folders], overwrite)
    plan = make_plan(synth)
    log.info(
        "planned %d NIH, %d COVID and %d pneumonia images (seed %d)",
        len(plan.nih),
        len(plan.covid),
        len(pneumonia),
        synth.seed,
    )
    pool, marker = synth.render_pool, synth.source_marker
    with Runner(workers) as runner:
        runner.run(
            write_nih_image,
            _render_order(plan.nih, synth),
            Target(synth.seed, nih_dir, synth.nih_image_size, pool=pool, marker=marker),
        )
        _write_nih_tables(plan, nih_dir)
        log.info("wrote %d NIH images under %s", len(plan.nih), nih_dir)
        covid_target = Target(synth.seed, covid_dir, synth.covid_image_size, nih_root=nih_dir, pool=pool, marker=marker)
        runner.run(write_covid_image, _render_order(plan.covid, synth), covid_target)
        log.info("wrote %d COVID images under %s", len(plan.covid), covid_dir)
        if pneumonia:
            _write_pneumonia(runner, pneumonia, pneumonia_dir, synth)
    manifest = _manifest(cfg, plan, pneumonia, nih_dir, covid_dir, pneumonia_dir)
    path = nih_dir.parent / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("manifest: %s", path)
    return manifest


def _write_pneumonia(runner: Runner, images: list[PneumoniaImage], folder: Path, synth: SynthConfig) -> None:
    for split in kermany.SPLITS:  # every split and class folder, as in the real set, even an empty one
        for cls in ("normal", "bacterial"):
            (folder / layouts.pneumonia_relpath(split, cls, "x")).parent.mkdir(parents=True, exist_ok=True)
    target = Target(synth.seed, folder, kermany.render_size(synth), pool=synth.render_pool, marker=synth.source_marker)
    runner.run(kermany.write_pneumonia_image, _render_order(images, synth), target)
    log.info("wrote %d pneumonia images under %s", len(images), folder)
