"""Helpers shared by the test tiers (plain functions; the fixtures built on them are in tests/conftest.py).

Test modules import from here (``from tests.helpers import ...``), never from one another.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.datasets import default_label_spaces
from pipelines.data.datasets.covid import DATASET_FOLDER as COVID_DATASET_FOLDER
from pipelines.data.datasets.nih import NIH14, format_nih_labels

ROOT = Path(__file__).resolve().parents[1]
SPACES = default_label_spaces()  # the registry's heads in order: nih14, covid, pneumonia
CONFIG = ROOT / "ray_config.yaml"
REAL_SAMPLES = ROOT.parent / "shared" / "real_samples"

# The key the Serve app tests hand the router through the environment, and the header that carries it.
API_KEY = "test-key-123"
KEY_ENV = "CXR_TEST_API_KEY"
HEADERS = {"X-API-Key": API_KEY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_beyond_loopback(pid: int) -> tuple[int, list[str]]:
    """(sockets ``pid`` and its descendants listen on, those off loopback as ip:port); Ray regroups some workers."""
    import psutil

    pids = {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
    found = [c.laddr for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    return len(found), [f"{a.ip}:{a.port}" for a in found if a.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]


def png(size: int = 200, seed: int = 0) -> bytes:
    """A radiograph-like grey PNG (the tiny shards' kind: the served app's OOD check passes it), new per seed."""
    pixels = _radiograph(np.random.default_rng(seed), 256)  # drawn at the layouts' size, then resized
    return encode_png(np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR)))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dicom(
    pixels: np.ndarray, modality: str = "DX", photometric: str = "MONOCHROME2", bits: int = 16, rows=None
) -> bytes:
    """A single-frame DICOM file (Secondary Capture) holding ``pixels``; ``rows`` can lie about the height."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows = rows if rows is not None else pixels.shape[0]
    ds.Columns = pixels.shape[1]
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def tiny_checkpoint(folder: Path, role: str, arch: str, size: int = 64, metadata: bool = False) -> Path:
    """An untrained timm test model (``test_efficientnet`` / ``test_vit``) saved as our checkpoint at ``size`` px,
    with the metadata fusion head when ``metadata``. Its weights follow torch's global seed: seed first where the
    values matter."""
    from models.checkpoint import save_checkpoint
    from models.factory import build_model

    model = build_model(arch, size, SPACES, metadata=metadata)
    config = {"data": {"storage_size": size}, "model": {"input_size": size}}
    return save_checkpoint(folder / role, model, role=role, epoch=0, config=config, metrics={"val_score": 0.5})


# ------------------------------------------------------------------------------------------- system programs


def require_program(path_or_name: str, why: str, install: str) -> str:
    """The program's path; without it the test skips, except under CI (env ``CI`` set), where it fails."""
    found = path_or_name if os.path.isabs(path_or_name) and os.path.isfile(path_or_name) else None
    found = found or (None if os.path.isabs(path_or_name) else shutil.which(path_or_name))
    if found is None:
        message = f"{path_or_name} is not installed ({install}; `make test-deps` does it as root): {why}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {message}")
        pytest.skip(message)
    return found


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port: no persistence, its files in a temp dir."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        binary = require_program("redis-server", "the Redis result-cache tests", "apt-get install -y redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(folder)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                assert self.process.poll() is None, f"redis-server exited with {self.process.returncode}"
                assert time.monotonic() < deadline, "redis-server never answered PING"
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


# ------------------------------------------------------------------------------------------- Serve


def deploy_schema(app_args: dict, port: int, user_config: dict | None = None):
    """serve/serve_config.yaml with test args, as `serve deploy` would send it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    tree["http_options"]["port"] = port
    app = tree["applications"][0]
    app["args"] = app_args
    app["runtime_env"] = {"env_vars": {KEY_ENV: API_KEY}}  # how an operator hands the key to the router
    if user_config is not None:
        app["deployments"] = [{"name": "EnsembleRouter", "user_config": user_config}]
    return ServeDeploySchema.model_validate(tree)


def replica_actors() -> dict[str, str]:
    """Serve replica actor name -> actor id (the name carries the replica id; both change on a restart)."""
    import ray

    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::cxr#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            found[actor["name"].split("#")[1] + "#" + actor["name"].split("#")[2]] = handle._actor_id.hex()
    return found


def wait_healthy(url: str, timeout_s: float = 60, poll_s: float = 0.5) -> None:
    """Poll ``GET /v1/health`` until it answers 200."""
    import requests

    deadline = time.monotonic() + timeout_s
    while requests.get(f"{url}/v1/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, f"{url} never became ready"
        time.sleep(poll_s)


# Limits of the app the tests under e2e/serve_app deploy (some test cases are built from them at collection).
APP_MAX_UPLOAD_MB = 0.5
APP_ROUTER_QUEUE = 4


def post(served: dict, data=None, files=None, mode=None, headers=HEADERS, path="/v1/predict", timeout=60):
    """POST to the app of ``served`` (a dict with its ``url``); the response."""
    import requests

    params = {"mode": mode} if mode else None
    return requests.post(served["url"] + path, data=data, files=files, params=params, headers=headers, timeout=timeout)


# Small Serve resources that fit beside each other on the tests' 2-CPU local Ray.
SMALL_SERVE_SETS = [
    "serve.request_timeout_s=20",
    "serve.router={num_cpus: 0.4, max_ongoing_requests: 8, max_queued_requests: 16}",
    "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
    "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
]


# ------------------------------------------------------------------------------------------- dataset layouts

NIH_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]  # fmt: skip


def _radiograph(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.7 - 0.5 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    base -= 0.5 * np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    noise = rng.normal(0, 0.08, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
    return (np.clip(base + noise, 0, 1) * 255).astype(np.uint8)


def write_layouts(
    root: Path, patients: int = 12, covid_per_class: int = 5, size: int = 64, pneumonia_patients: int = 4
) -> dict:
    """Tiny hand-written dataset folders ``root/nih``, ``root/covid`` and ``root/pneumonia`` in the real NIH, COVID
    and Kermany layouts, for tests that must not depend on the synthetic generator: known labels, known patients,
    planted corrupt files and cross-dataset twins (NIH-COVID and COVID-pneumonia). Returns what was planted."""
    rng = np.random.default_rng(0)
    nih, archive = root / "nih", root / "nih" / "images_001" / "images"
    archive.mkdir(parents=True)
    rows, test_names, train_names = [], [], []
    for patient in range(1, patients + 1):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            labels = [int(rng.random() < 0.2) for _ in NIH14]
            pixels = _radiograph(rng, size)
            if patient == 1 and follow_up == 0:
                pixels = pixels.astype(np.uint16) * 257  # 16-bit
            if patient == 2 and follow_up == 0:
                pixels = np.dstack([pixels] * 3 + [np.full_like(pixels, 255)])  # RGBA
            (archive / name).write_bytes(encode_png(pixels))
            rows.append([name, format_nih_labels(labels), follow_up, patient, 40, "F", "PA", 2500, 2048, 0.143, 0.143])
            (test_names if patient % 4 == 0 else train_names).append(name)
    planted = {"empty": "00000003_000.png", "truncated": "00000005_001.png", "not_an_image": "00000006_000.png"}
    (archive / planted["empty"]).write_bytes(b"")
    (archive / planted["truncated"]).write_bytes((archive / planted["truncated"]).read_bytes()[:300])
    (archive / planted["not_an_image"]).write_text("not a radiograph")
    rows[-1][1] = "Bogus_Finding"  # label outside the label space
    (archive / "99999999_000.png").write_bytes(encode_png(_radiograph(rng, size)))  # not in the CSV
    rows.append(["77777777_000.png", "No Finding", 0, 77777777, 50, "M", "AP", 2500, 2048, 0.14, 0.14])  # no image
    train_names.append("77777777_000.png")
    with open(nih / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    (nih / "train_val_list.txt").write_text("\n".join(train_names))
    (nih / "test_list.txt").write_text("\n".join(test_names))

    covid = root / "covid" / COVID_DATASET_FOLDER
    for cls in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        folder = covid / cls / "images"
        folder.mkdir(parents=True)
        for n in range(1, covid_per_class + 1):
            (folder / f"{cls}-{n}.png").write_bytes(encode_png(_radiograph(rng, size)))
    # A twin: an NIH image re-encoded into the COVID set at another size and a slightly different brightness.
    twin_source = archive / "00000004_000.png"
    twin = np.asarray(Image.open(twin_source).resize((80, 80))).astype(int) + 3
    (covid / "Normal" / "images" / f"Normal-{covid_per_class + 1}.png").write_bytes(
        encode_png(np.clip(twin, 0, 255).astype(np.uint8))
    )
    pneumonia = _write_kermany(root / "pneumonia" / "chest_xray", rng, size, pneumonia_patients)
    # A twin across the other pair: a COVID image re-encoded as a Kermany JPEG (it must follow the COVID split).
    covid_twin = covid / "COVID" / "images" / "COVID-2.png"
    kermany_twin = root / "pneumonia" / "chest_xray" / "train" / "PNEUMONIA" / "person900_virus_1.jpeg"
    Image.open(covid_twin).resize((72, 72)).save(kermany_twin, quality=95)
    return {
        "nih_images": patients * 2 + 1,
        "covid_images": 4 * covid_per_class + 1,
        "pneumonia_images": pneumonia["images"] + 2,  # and the twin and the badly named file
        "pneumonia_bad_name": pneumonia["bad_name"],
        "covid_pneumonia_twin": ("COVID/images/COVID-2.png", "train/PNEUMONIA/person900_virus_1.jpeg"),
        "corrupt": planted,
        "bad_label": rows[-2][0],
        "not_in_csv": "99999999_000.png",
        "twin": ("images_001/images/00000004_000.png", f"Normal/images/Normal-{covid_per_class + 1}.png"),
    }


def write_shards(root: Path, rows_per_split: int = 12, size: int = 48) -> Path:
    """test/ and val/ parquet shards written with pyarrow (no Ray), with the columns ingest writes that the export
    stage and ``cxr bench export`` read, and a manifest naming the label spaces; the sources take turns."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for index, split in enumerate(("test", "val")):
        spaces = [SPACES[i % len(SPACES)] for i in range(rows_per_split)]
        images = [np.random.default_rng(100 * index + i).integers(0, 256, (size, size), dtype=np.uint8) for i in
                  range(rows_per_split)]  # fmt: skip
        labels = [
            [i % 2] * len(space.classes) if space.multi_label else [i % len(space.classes)]
            for i, space in enumerate(spaces)
        ]
        table = pa.table(
            {
                "image": pa.array([encode_png(pixels) for pixels in images], pa.binary()),
                "source": [space.source for space in spaces],
                "labels": pa.array(labels, pa.list_(pa.int64())),
                "age": pa.array(
                    [40 + i if space.source == "nih" else None for i, space in enumerate(spaces)], pa.int64()
                ),
                "sex": ["F" if space.source == "nih" else None for space in spaces],
                "view_position": ["PA" if space.source == "nih" else None for space in spaces],
            }
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"label_spaces": [space.to_dict() for space in SPACES]}))
    return root


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: relative path -> (size, mtime_ns, bytes), to prove a run wrote nothing there."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ------------------------------------------------------------------------------------------- result cache

CACHE_FINGERPRINTS = {"cnn": "c" * 64, "vit": "v" * 64}


def run_async(coroutine):
    return asyncio.run(coroutine)


def router_answer(value: float = 0.25, fingerprints: dict | None = None) -> dict:
    """What EnsemblePipeline.answer returns, with float32 arrays as the replicas send them."""
    return {
        "probs": {"nih14": np.full(14, value, np.float32), "covid": np.array([0.1, 0.2, 0.3, 0.4], np.float32)},
        "models_used": ["cnn"],
        "cnn_confidence": 0.9,
        "escalated": False,
        "timings": {"cnn_ms": 3.0},
        "fingerprints": fingerprints or {"cnn": CACHE_FINGERPRINTS["cnn"]},
    }


class RecordingMetrics:
    """Records the cache's metric calls (the router's real metrics need a Serve replica)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cache_hit(self, store: str) -> None:
        self.calls.append(("hit", store))

    def cache_miss(self, store: str) -> None:
        self.calls.append(("miss", store))

    def cache_error(self, store: str, operation: str) -> None:
        self.calls.append(("error", store, operation))


def _write_kermany(dataset: Path, rng: np.random.Generator, size: int, patients: int) -> dict:
    """``chest_xray/{train,test}/{NORMAL,PNEUMONIA}`` with ``patients`` normal studies, bacterial and viral patients
    per split (two images each, one RGB), and one PNEUMONIA file whose name carries no class (a reject)."""
    images = 0
    for split_index, split in enumerate(("train", "test")):
        for kind in ("normal", "bacteria", "virus"):
            folder = dataset / split / ("NORMAL" if kind == "normal" else "PNEUMONIA")
            folder.mkdir(parents=True, exist_ok=True)
            for patient in range(1, patients + 1):
                number = 100 * split_index + patient
                for image in range(2):
                    name = (
                        f"IM-{number:04d}-{image + 1:04d}.jpeg"
                        if kind == "normal"
                        else f"person{number}_{kind}_{image}.jpeg"
                    )
                    pixels = _radiograph(rng, size + 8 * image)
                    picture = Image.fromarray(pixels).convert("RGB" if image else "L")
                    picture.save(folder / name, quality=90)
                    images += 1
    bad_name = "train/PNEUMONIA/scan_0001.jpeg"
    Image.fromarray(_radiograph(rng, size)).save(dataset / bad_name, quality=90)
    return {"images": images, "bad_name": bad_name}
