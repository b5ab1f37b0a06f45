"""A checkpoint's probabilities on every row of a split: in this process, or as Ray Data batch inference.

Both paths read the shards in file order, prepare images with the same function (``preprocess_table``, the
evaluation transform at the checkpoint's input size and label spaces) and return the same arrays row for row: one
``[N, K]`` array of probabilities per head (sigmoid or softmax, as its label space says), ``source`` (the index of
the row's head) and each head's labels (``label_<head>``). The local path suits small sets (no start-up);
Ray Data spreads a large split over an actor pool of model replicas, one per GPU when the cluster has GPUs
(``evaluate.inference``: ``auto`` switches at ``evaluate.ray_min_rows`` rows). With ``tta`` > 0 both average that
many augmented passes in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.checkpoint import META_FILE, label_spaces_of, model_from_checkpoint
from models.labels import LabelSpace
from pipelines.config import Config
from pipelines.data.shards import SHARD_COLUMNS, local_batches
from pipelines.data.transforms import TransformSpec, preprocess_table
from pipelines.train.steps import predict

log = logging.getLogger(__name__)


def predict_local(
    model: torch.nn.Module, cfg: Config, files: list[str], tta: int = 0, use_metadata: bool = True
) -> dict[str, np.ndarray]:
    """Probabilities on every row of ``files`` in this process; with ``tta`` > 0, averaged with augmented passes.
    ``use_metadata=False`` hides the rows' patient metadata from a fusion model (``steps.predict``)."""
    device, size = torch.device("cpu"), cfg.evaluate.batch_size
    spaces = tuple(model.label_spaces)
    spec = TransformSpec(model.input_size, spaces, **cfg.data.augment.model_dump())
    passes = [
        predict(model, local_batches(files, spec, train, size), device, use_metadata=use_metadata)
        for train in (False, *[True] * tta)
    ]
    return _average(passes, spaces)


def _average(passes: list[dict[str, np.ndarray]], spaces: tuple[LabelSpace, ...]) -> dict[str, np.ndarray]:
    """Every head's probabilities averaged over the passes; ``source`` and labels are those of the first."""
    result = dict(passes[0])
    for space in spaces:
        result[space.head] = sum(p[space.head] for p in passes) / len(passes)
    return result


class SplitPredictor:
    """One model replica of Ray Data's actor pool: stored rows -> every head's probabilities, labels kept."""

    def __init__(self, checkpoint_dir: str, spec: TransformSpec, train: bool, threads: int) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(checkpoint_dir).to(self.device)
        self.spec, self.train = spec, train

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        arrays = preprocess_table(table, self.spec, self.train)
        return predict(self.model, [{k: torch.from_numpy(v) for k, v in arrays.items()}], self.device)


def predict_ray(cfg: Config, checkpoint_dir: str | Path, files: list[str], tta: int = 0) -> dict[str, np.ndarray]:
    """The same probabilities as ``predict_local``, from Ray Data batch inference over an actor pool."""
    import ray

    from pipelines.data.streaming import configure_data_context
    from pipelines.runtime import ensure_ray

    ensure_ray(cfg)
    configure_data_context()
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows come back in file order, as the local path reads them
    meta = json.loads((Path(checkpoint_dir) / META_FILE).read_text())  # size and heads, without loading weights
    spaces = label_spaces_of(meta)
    spec = TransformSpec(int(meta["preprocessing"]["input_size"]), spaces, **cfg.data.augment.model_dump())
    try:
        passes = [_ray_pass(cfg, str(checkpoint_dir), files, spec, train) for train in (False, *[True] * tta)]
    finally:
        context.execution_options.preserve_order = preserve
    return _average(passes, spaces)


def _ray_pass(cfg: Config, checkpoint_dir: str, files: list[str], spec: TransformSpec, train: bool) -> dict:
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors = cfg.evaluate.actors or (gpus if gpus else max(1, cpus - 1))
    ds = ray.data.read_parquet(files, override_num_blocks=len(files)).select_columns(SHARD_COLUMNS)
    ds = ds.map_batches(
        SplitPredictor,
        fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "spec": spec, "train": train, "threads": 1},
        batch_size=cfg.evaluate.batch_size,
        batch_format="pyarrow",
        concurrency=actors,
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def use_ray(cfg: Config, files: list[str]) -> bool:
    if cfg.evaluate.inference != "auto":
        return cfg.evaluate.inference == "ray"
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) >= cfg.evaluate.ray_min_rows


def predict_checkpoint(
    cfg: Config, checkpoint_dir: str | Path, files: list[str], tta: int = 0, model: Any = None
) -> dict[str, np.ndarray]:
    """Probabilities of a checkpoint on ``files`` by the path ``evaluate.inference`` picks; ``model``, when the
    caller has it loaded already, spares the local path a second load."""
    if use_ray(cfg, files):
        log.info("batch inference on Ray Data: %s over %d shard files", checkpoint_dir, len(files))
        return predict_ray(cfg, checkpoint_dir, files, tta)
    return predict_local(model if model is not None else model_from_checkpoint(checkpoint_dir), cfg, files, tta)
