"""Synthetic chest radiographs written in the exact on-disk layouts of NIH ChestX-ray14 and the COVID-19
Radiography Database, so that every later stage runs on data the project generates itself.

``synthesize(cfg)`` plans patients, labels, splits and plants (``plan``), renders each image from its own
seeded generator (``render``: ``anatomy`` + ``findings`` / ``covid_findings``) in a process pool
(``runner``), writes the label CSV and split lists (``layouts``), and records counts and the ground truth of
the planted duplicates and corrupt files in ``synth_manifest.json`` beside the NIH folder.
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

from models.labels import COVID_CLASSES, NIH14, NO_FINDING
from pipelines.config import Config, SynthConfig
from pipelines.data.synth import layouts
from pipelines.data.synth.plan import CovidImage, NihImage, Plan, make_plan
from pipelines.data.synth.pool import base_key
from pipelines.data.synth.runner import Runner, Target, write_covid_image, write_nih_image

log = logging.getLogger(__name__)

__all__ = ["synthesize", "MANIFEST_NAME"]
MANIFEST_NAME = layouts.MANIFEST_NAME
_NIH_ENTRIES = re.compile(r"^(images_\d{3}|Data_Entry_2017_v2020\.csv|train_val_list\.txt|test_list\.txt)$")
_COVID_ENTRIES = re.compile(rf"^{re.escape(layouts.COVID_DATASET_FOLDER)}$")


def _prepare(folder: Path, overwrite: bool, ours: re.Pattern[str]) -> None:
    """Create ``folder``; refuse a non-empty one unless ``overwrite``, and then only if it holds only our files."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass overwrite=True (--overwrite) to replace it")
    if entries:
        foreign = [name for name in entries if not ours.match(name)]
        if foreign:
            raise FileExistsError(
                f"{folder} holds files cxr synth did not write ({', '.join(foreign[:5])}); not removing it"
            )
        log.info("removing the previous contents of %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def _render_order(images: list, synth: SynthConfig) -> list:
    """With a render pool, images that share a base render go to the same worker chunk (the files do not change)."""
    if not synth.render_pool:
        return images

    def key(img: NihImage | CovidImage) -> tuple:
        source, labels = ("nih", img.findings) if isinstance(img, NihImage) else ("covid", (img.cls,))
        return base_key(synth.seed, source, img.index, labels, synth.render_pool)

    return sorted(images, key=key)


def _write_nih_tables(plan: Plan, root: Path) -> None:
    listed = [img for img in plan.nih if img.plant != "not_in_csv"]
    layouts.write_nih_csv(root / layouts.NIH_CSV_NAME, (img.csv_row() for img in listed))
    layouts.write_name_list(root / layouts.NIH_TRAIN_VAL_LIST, (img.name for img in listed if not img.test))
    layouts.write_name_list(root / layouts.NIH_TEST_LIST, (img.name for img in listed if img.test))


def _manifest(cfg: Config, plan: Plan, nih_dir: Path, covid_dir: Path) -> dict[str, Any]:
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
        "duplicates": plan.duplicates,
        "corrupt": plan.corrupt,
    }


def synthesize(
    cfg: Config,
    nih_dir: Path | None = None,
    covid_dir: Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic NIH and COVID datasets described by ``cfg.data.synth``; returns the manifest dict.

    ``nih_dir`` / ``covid_dir`` default to ``cfg.data.nih_dir`` / ``cfg.data.covid_dir``. A non-empty target
    folder raises ``FileExistsError`` unless ``overwrite``. ``workers`` processes render (default: all cores);
    the files are byte-identical whatever the number.
    """
    synth = cfg.data.synth
    nih_dir = Path(nih_dir if nih_dir is not None else cfg.data.nih_dir)
    covid_dir = Path(covid_dir if covid_dir is not None else cfg.data.covid_dir)
    a, b = nih_dir.resolve(), covid_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise FileExistsError(f"the NIH folder {nih_dir} and the COVID folder {covid_dir} must not overlap")
    _prepare(nih_dir, overwrite, _NIH_ENTRIES)
    _prepare(covid_dir, overwrite, _COVID_ENTRIES)
    plan = make_plan(synth)
    log.info("planned %d NIH and %d COVID images (seed %d)", len(plan.nih), len(plan.covid), synth.seed)
    pool = synth.render_pool
    with Runner(workers) as runner:
        runner.run(
            write_nih_image,
            _render_order(plan.nih, synth),
            Target(synth.seed, nih_dir, synth.nih_image_size, pool=pool),
        )
        _write_nih_tables(plan, nih_dir)
        log.info("wrote %d NIH images under %s", len(plan.nih), nih_dir)
        covid_target = Target(synth.seed, covid_dir, synth.covid_image_size, nih_root=nih_dir, pool=pool)
        runner.run(write_covid_image, _render_order(plan.covid, synth), covid_target)
        log.info("wrote %d COVID images under %s", len(plan.covid), covid_dir)
    manifest = _manifest(cfg, plan, nih_dir, covid_dir)
    path = nih_dir.parent / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("manifest: %s", path)
    return manifest
