"""`cxr serve --try N`: send a few test-split radiographs, as the original files, to the running HTTP endpoint and
print what it answers next to the truth. The demo ends with this; it is also a smoke test after a deploy.

The datasets and their heads come from the shards' manifest (its label spaces, and ``inputs``: each source's
dataset root, under which the shards' ``relpath`` lies), so no dataset is named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests

from models.labels import LabelSpace
from pipelines.config import Config
from pipelines.data.shards import load_manifest, manifest_label_spaces, shard_files

REQUEST_TIMEOUT_S = 60
NO_FINDING = "no finding"  # the truth / answer of a multi-label row with no class set


@dataclass(frozen=True)
class Sample:
    path: Path
    source: str  # the dataset it comes from (a registry source name)
    head: str  # the head that dataset trains: the one the gate scores and the line reports
    truth: str


def truth_text(space: LabelSpace, labels: list[int]) -> str:
    """A shard row's ``labels`` as words: the classes set (multi-label) or the class (multi-class)."""
    if space.multi_label:
        return ", ".join(name for name, v in zip(space.classes, labels, strict=True) if v) or NO_FINDING
    return space.classes[labels[0]]


def pick_test_images(cfg: Config, count: int) -> list[Sample]:
    """``count`` test-split images, the datasets taking turns (head order), read from the folders ingest listed."""
    manifest = load_manifest(cfg.data.shards_dir)
    spaces = manifest_label_spaces(cfg.data.shards_dir)
    roots = {
        space.source: Path(manifest["inputs"][space.source]) for space in spaces if space.source in manifest["inputs"]
    }
    table = pq.read_table(shard_files(cfg.data.shards_dir, "test"), columns=["source", "relpath", "labels"])
    rows = {
        s.source: table.filter(pc.equal(table["source"], s.source)).to_pylist() for s in spaces if s.source in roots
    }
    turns = [space for space in spaces if rows.get(space.source)]
    picked: list[Sample] = []
    taken = dict.fromkeys(rows, 0)
    while turns and len(picked) < count:
        for space in list(turns):
            if len(picked) == count:
                break
            if taken[space.source] >= len(rows[space.source]):
                turns.remove(space)
                continue
            row = rows[space.source][taken[space.source]]
            taken[space.source] += 1
            path = roots[space.source] / row["relpath"]
            picked.append(Sample(path, space.source, space.head, truth_text(space, row["labels"])))
    return picked


def head_text(answer: dict) -> str:
    """A head's answer in words: the findings reported (multi-label) or the top class with its probability."""
    if answer["multi_label"]:
        return ", ".join(answer["findings"]) or NO_FINDING
    return f"{answer['top_class']} ({answer['top_probability']:.2f})"


def describe_answer(sample: Sample, body: dict) -> str:
    """One line: what the image is, what the service said on that image's head, who answered, how fast."""
    answer = head_text(body[sample.head])
    gate = body["gate"]
    refer = "  refer" if body.get("refer") else ""
    return (
        f"{sample.path.name:<22} {sample.head:<10} truth: {sample.truth:<32} answer: {answer:<32} "
        f"models: {'+'.join(body['models_used'])}  confidence {body['cnn_confidence']:.2f} vs threshold "
        f"{gate['threshold']:.2f}{refer}  {body['latency_ms']['total']:.0f} ms"
    )


def describe_refusal(sample: Sample, body: dict) -> str:
    """A test image the out-of-distribution check refused: one of its false refusals (``ood.false_refusal``)."""
    ood = body["ood"]
    return (
        f"{sample.path.name:<22} {sample.head:<10} truth: {sample.truth:<32} refused: not_a_chest_radiograph "
        f"(score {ood['score']:.2f} > {ood['threshold']:.2f}; a false refusal, the check's cost)"
    )


def try_images(url: str, cfg: Config, count: int, api_key: str | None = None) -> int:
    """POST each sample to ``/v1/predict``; prints one line per image and returns how many failed (a test image
    the out-of-distribution check refuses is a false refusal it is tuned to make now and then, not a failure)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    failures = 0
    for sample in pick_test_images(cfg, count):
        response = requests.post(
            f"{url}/v1/predict",
            params={"head": sample.head},  # the gate scores the head we read
            data=sample.path.read_bytes(),
            headers=headers,
            timeout=REQUEST_TIMEOUT_S,
        )
        if response.status_code == 422 and "ood" in response.json():
            print(describe_refusal(sample, response.json()))
            continue
        if response.status_code != 200:
            failures += 1
            print(f"{sample.path.name}: HTTP {response.status_code} {response.text[:200]}")
            continue
        print(describe_answer(sample, response.json()))
    return failures
