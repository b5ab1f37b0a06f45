"""`cxr serve --try N`: send a few test-split radiographs, as the original files, to the running HTTP endpoint and
print what it answers next to the truth. The demo ends with this; it is also a smoke test after a deploy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests

from models.labels import NIH14
from pipelines.config import Config
from pipelines.data.layouts import covid_dataset_root
from pipelines.data.shards import load_manifest, shard_files

REQUEST_TIMEOUT_S = 60


@dataclass(frozen=True)
class Sample:
    path: Path
    source: str  # "nih" or "covid"
    truth: str


def pick_test_images(cfg: Config, count: int) -> list[Sample]:
    """``count`` test-split images, alternating between the datasets, read from the folders ingest listed."""
    manifest = load_manifest(cfg.data.shards_dir)
    roots = {"nih": Path(manifest["inputs"]["nih"]), "covid": covid_dataset_root(manifest["inputs"]["covid"])}
    classes = manifest["label_spaces"]["covid"]
    table = pq.read_table(
        shard_files(cfg.data.shards_dir, "test"), columns=["source", "relpath", "nih_labels", "covid_label"]
    )
    per_source = {source: table.filter(pc.equal(table["source"], source)).to_pylist() for source in roots}
    picked: list[Sample] = []
    for index in range(count):
        rows = per_source["nih" if index % 2 == 0 else "covid"] or per_source["nih"] or per_source["covid"]
        if index // 2 >= len(rows):
            break
        row = rows[index // 2]
        if row["source"] == "nih":
            truth = ", ".join(name for name, v in zip(NIH14, row["nih_labels"], strict=True) if v) or "No Finding"
        else:
            truth = classes[row["covid_label"]]
        picked.append(Sample(roots[row["source"]] / row["relpath"], row["source"], truth))
    return picked


def describe_answer(sample: Sample, body: dict) -> str:
    """One line: what the image is, what the service said on that image's head, who answered, how fast."""
    if sample.source == "covid":
        answer = f"{body['covid']['top_class']} ({body['covid']['top_probability']:.2f})"
    else:
        answer = ", ".join(body["nih14"]["findings"]) or "No Finding"
    gate = body["gate"]
    return (
        f"{sample.path.name:<22} truth: {sample.truth:<32} answer: {answer:<32} models: {'+'.join(body['models_used'])}"
        f"  confidence {body['cnn_confidence']:.2f} vs threshold {gate['threshold']:.2f}"
        f"  {body['latency_ms']['total']:.0f} ms"
    )


def try_images(url: str, cfg: Config, count: int, api_key: str | None = None) -> int:
    """POST each sample to ``/v1/predict``; prints one line per image and returns how many failed."""
    headers = {"X-API-Key": api_key} if api_key else {}
    failures = 0
    for sample in pick_test_images(cfg, count):
        response = requests.post(
            f"{url}/v1/predict",
            params={"head": "nih14" if sample.source == "nih" else "covid"},  # the gate scores the head we read
            data=sample.path.read_bytes(),
            headers=headers,
            timeout=REQUEST_TIMEOUT_S,
        )
        if response.status_code != 200:
            failures += 1
            print(f"{sample.path.name}: HTTP {response.status_code} {response.text[:200]}")
            continue
        print(describe_answer(sample, response.json()))
    return failures
