"""The schema of the one configuration tree: one pydantic model per section (data, model, train, tune, ensemble,
serve, export, cluster, mlflow). Unknown keys are errors; values are checked where they are declared. The data
section lives in ``data.py``, the shared base in ``base.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import ConfigError, Strict
from pipelines.config.data import AugmentConfig, DataConfig, SynthConfig

__all__ = ["AugmentConfig", "ConfigError", "DataConfig", "Strict", "SynthConfig"]  # re-exported


# ---------------------------------------------------------------------------------------------- model


class ArchConfig(Strict):
    """One timm backbone; ``pretrained`` is a local weights file, never a download."""

    name: str
    pretrained: Path | None = None
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    # This architecture's epoch budget, in place of train.epochs: a ViT trained from scratch needs more than a CNN.
    epochs: int | None = Field(None, ge=1)
    # Extra keyword arguments for timm.create_model, e.g. {patch_size: 8} for a ViT on small inputs.
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    # the fusion head: the heads also read an embedding of age, sex and view position (models/metadata.py; rows and
    # requests without them use "missing" indicators)
    metadata: bool = False


class ModelConfig(Strict):
    cnn: ArchConfig = ArchConfig(name="efficientnet_b0")
    vit: ArchConfig = ArchConfig(name="vit_small_patch16_224")
    input_size: int = Field(224, ge=16, le=1024)
    # Images are single-channel; these normalise the [0, 1] grayscale range.
    mean: float = Field(0.5, ge=0.0, le=1.0)
    std: float = Field(0.25, gt=0.0)


# ---------------------------------------------------------------------------------------------- train


class TrainConfig(Strict):
    run_dir: Path = Path("runs/train")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)  # below 1 on small machines, so Ray Data keeps CPUs to stream with
    use_gpu: Literal["auto"] | bool = "auto"
    # PACK: workers share a node where they fit; SPREAD: one per node where it can (survives losing a node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoints_to_keep: int = Field(2, ge=1)
    early_stopping_patience: int = Field(5, ge=1)
    max_failures: int = Field(2, ge=-1)
    # decode and transform the validation split once, kept in the object store, instead of once per epoch
    cache_val: bool = False
    # micro-batches of batch_size per optimizer step (DDP all-reduces once per step): effective batch
    # = batch_size x num_workers x grad_accum_steps; warm-up and cosine count optimizer steps
    grad_accum_steps: int = Field(1, ge=1)
    # full: every parameter trains; linear_probe: frozen backbone (eval mode), heads only, the whole run;
    # two_phase: heads only for freeze_backbone_epochs epochs, then the whole network (pipelines/train/recipes.py)
    recipe: Literal["full", "linear_probe", "two_phase"] = "full"
    freeze_backbone_epochs: int = Field(0, ge=0)  # two_phase only: the heads-only epochs before unfreezing
    backbone_lr_scale: float = Field(1.0, gt=0.0)  # the backbone's learning rate is lr x this

    @model_validator(mode="after")
    def _recipe(self) -> TrainConfig:
        if self.recipe == "two_phase" and self.freeze_backbone_epochs < 1:
            raise ValueError("train.recipe=two_phase needs train.freeze_backbone_epochs >= 1 (heads-only epochs)")
        if self.recipe != "two_phase" and self.freeze_backbone_epochs:
            raise ValueError(
                f"train.freeze_backbone_epochs={self.freeze_backbone_epochs} is only read by train.recipe=two_phase"
                f" (got train.recipe={self.recipe}); set both, or freeze_backbone_epochs=0"
            )
        return self


class EvaluateConfig(Strict):
    """How evaluation and tune stage B compute a split's predictions."""

    # local: one process reads the shards; ray: Ray Data batch inference over an actor pool of model replicas
    # (one per GPU when the cluster has GPUs); auto: ray from ray_min_rows rows on
    inference: Literal["auto", "local", "ray"] = "auto"
    ray_min_rows: int = Field(100000, ge=0)  # on 2 cores one process is 1.6x faster at 25k rows (RESULTS.md)
    batch_size: int = Field(64, ge=1)
    actors: int | None = Field(None, ge=1)  # None: one per GPU, or on CPUs one per CPU but one (left for reading)
    # patient-level bootstrap replicates behind the report's 95% intervals (cnn, vit, ensemble, adaptive); 0: none
    bootstrap_replicates: int = Field(100, ge=0)


class OodConfig(Strict):
    """The out-of-distribution check (``models/ood.py``): fitted by tune stage B, applied by serving and evaluation."""

    # serving refuses an image past the threshold (422 not_a_chest_radiograph; ?ood=off per request skips the
    # refusal); false: every image is answered, its score still reported
    enabled: bool = True
    false_refusal: float = Field(0.01, gt=0.0, lt=0.5)  # share of validation images the threshold refuses
    side: int = Field(32, ge=4, le=128)  # images are compared at side x side pixels
    components: int = Field(16, ge=1)  # of the linear autoencoder (PCA)
    fit_images: int = Field(4096, ge=32)  # training images (a random sample) the check is fitted on
    negatives_per_kind: int = Field(20, ge=0)  # cxr evaluate: non-radiographs of each kind scored (0: none)


# ----------------------------------------------------------------------------------------------- tune


class EnsembleTuneConfig(Strict):
    num_samples: int = Field(200, ge=1)
    objective: Literal["constrained", "tradeoff"] = "constrained"
    max_vit_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # quality = weighted mean over heads of each head's main figure (macro AUROC multi-label, macro F1 multi-class);
    # a head not named here weighs 1.0, so by default every head counts the same (as in the training score)
    head_weights: dict[str, float] = {}
    vit_cost: float = Field(0.1, ge=0.0)  # tradeoff objective: quality - vit_cost * vit_fraction
    # the share of validation images the gated ensemble answers; below the confidence that leaves this share, an
    # answer says "refer" (1.0: never)
    refer_coverage: float = Field(0.95, gt=0.0, le=1.0)
    calibrate: bool = True  # temperature scaling per model and head before the search; false: raw probabilities

    @field_validator("head_weights")
    @classmethod
    def _non_negative_weights(cls, value: dict[str, float]) -> dict[str, float]:
        from pipelines.data.datasets import default_label_spaces  # the registry reads no config: no cycle

        known = [space.head for space in default_label_spaces()]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown heads {unknown}; known: {known}")
        bad = {head: weight for head, weight in value.items() if weight < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return value


class TuneConfig(Strict):
    num_samples: int = Field(8, ge=1)
    lr_min: float = Field(1e-5, gt=0.0)
    lr_max: float = Field(3e-3, gt=0.0)
    weight_decay: list[float] = [0.01, 0.05]
    drop_rate: list[float] = [0.0, 0.1]
    grace_period: int = Field(2, ge=1)
    ensemble: EnsembleTuneConfig = EnsembleTuneConfig()

    @model_validator(mode="after")
    def _lr_range(self) -> TuneConfig:
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be below lr_max ({self.lr_max})")
        return self


# ------------------------------------------------------------------------------------- ensemble, serve


class EnsembleConfig(Strict):
    """The adaptive ensemble: CNN alone when confident, else ``w_cnn * p_cnn + (1 - w_cnn) * p_vit``."""

    w_cnn: float = Field(0.4, ge=0.0, le=1.0)
    threshold: float = Field(0.85, ge=0.0, le=1.0)


class DeploymentConfig(Strict):
    """One model deployment of the Serve app (CNN or ViT): where its weights come from, scaling and batching."""

    # Weights: a checkpoint directory, or an MLflow registered model version "name/version" (e.g. cxr-cnn/3);
    # neither: the best checkpoint of the last `cxr train --model <role>` (<train.run_dir>/latest-<role>.json).
    checkpoint: Path | None = None
    registered_model: str | None = Field(None, pattern=r"^[^/]+/\d+$")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int = Field(1, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0.0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    batch_max_size: int = Field(16, ge=1)
    # 0: no waiting for company at low load; under load a batch still forms from the queue that builds while
    # the previous batch computes (one batch at a time per replica)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)  # torch in the replica uses max(1, floor(num_cpus)) threads
    num_gpus: Literal["auto"] | float = "auto"  # "auto": a fraction of a GPU where the cluster has GPUs
    # onnx: ONNX Runtime on CPU replicas (fp32 or int8, from `cxr export`); a replica on a GPU stays on PyTorch
    backend: Literal["torch", "onnx"] = "torch"
    onnx_model: Path | None = None  # None: the latest `cxr export` of this role (<export.out_dir>/latest-<role>.json)

    @model_validator(mode="after")
    def _replica_bounds(self) -> DeploymentConfig:
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("replicas must satisfy min_replicas <= initial_replicas <= max_replicas")
        if self.checkpoint is not None and self.registered_model is not None:
            raise ValueError("give checkpoint or registered_model, not both")
        return self


class RouterConfig(Strict):
    """The HTTP ingress (EnsembleRouter): decoding, preprocessing and the gate; it holds no model."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(128, ge=-1)  # past this the proxy answers 503 at once
    num_cpus: float = Field(1.0, gt=0.0)


class CacheConfig(Strict):
    """The router's result cache, keyed by the decoded image, the model fingerprints and the gate settings."""

    enabled: bool = True
    max_entries: int = Field(2048, ge=1)  # in-process LRU (per router replica)
    # e.g. redis://127.0.0.1:6379/0: one cache shared by every router replica
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    ttl_s: float = Field(3600.0, gt=0.0)  # Redis entries expire after this


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # an HTTP proxy per node, or on the head only (several Ray nodes on one machine would share the port)
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    max_upload_mb: float = Field(20.0, gt=0.0)  # per image; larger uploads get 413 before they are read
    max_pixels: int = Field(50_000_000, ge=1)  # width x height from the header; more is a decompression bomb (413)
    max_batch_images: int = Field(16, ge=1)  # images per POST /v1/predict/batch
    request_timeout_s: float = Field(30.0, gt=0.0)  # one model call; past it the request gets 503
    api_key_env: str | None = None  # name of the environment variable holding the API key; None: no key
    dicom_modalities: list[str] = ["CR", "DX", "DR", "RG"]  # projection radiography only
    # classes of a multi-label head (NIH's findings) are reported above this probability ...
    finding_threshold: float = Field(0.5, ge=0.0, le=1.0)
    finding_thresholds: dict[str, float] = {}  # ... or above a per-class value given here
    access_log: bool = False  # Serve's per-request access log lines; off, they cost CPU on small machines
    # requests between deployments (router -> models; proxy -> router where a stage starts its own Ray) over gRPC
    # instead of Ray actor calls: less CPU per request (benchmarks/RESULTS.md)
    grpc: bool = True
    router: RouterConfig = RouterConfig()
    cache: CacheConfig = CacheConfig()
    cnn: DeploymentConfig = DeploymentConfig()
    vit: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="after")
    def _known_findings(self) -> ServeConfig:
        from pipelines.data.datasets import default_label_spaces  # the registry reads no config: no cycle

        known = [name for space in default_label_spaces() if space.multi_label for name in space.classes]
        unknown = sorted(set(self.finding_thresholds) - set(known))
        if unknown:
            raise ValueError(f"finding_thresholds: unknown findings {unknown}; known: {known}")
        bad = {k: v for k, v in self.finding_thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"finding_thresholds: values must be in [0, 1], got {bad}")
        return self


# --------------------------------------------------------------------------------------------- export


class ExportConfig(Strict):
    """`cxr export`: ONNX files of a checkpoint, checked against PyTorch, optionally quantised to int8."""

    out_dir: Path = Path("runs/export")  # <out_dir>/<role>/<checkpoint>/model*.onnx + latest-<role>.json
    parity_atol: float = Field(1e-4, gt=0.0)  # max |ONNX logit - PyTorch logit| allowed at fp32
    parity_batches: int = Field(8, ge=1)  # test-split batches the fp32 and int8 models are compared on
    batch_size: int = Field(32, ge=1)  # of the parity and calibration batches
    calibration_batches: int = Field(8, ge=1)  # validation batches that calibrate static int8
    # dynamic int8 quantises these ops only: ORT's integer Conv (ConvInteger) is far slower than its fp32 Conv
    dynamic_op_types: list[str] = ["MatMul", "Gemm"]
    # static int8 per role ([]: every op ORT can quantise); the ViT's LayerNorm/Softmax/GELU in int8 cost agreement
    static_op_types: dict[Literal["cnn", "vit"], list[str]] = {"cnn": [], "vit": ["Conv", "MatMul", "Gemm"]}


# ------------------------------------------------------------------------------------- cluster, mlflow


class LocalClusterConfig(Strict):
    """``cxr cluster up``: a head and worker nodes on this machine, all on loopback, token auth on."""

    state_dir: Path = Path("runs/cluster")  # the token (mode 600), the state file and the nodes' log
    gcs_port: int = Field(6380, ge=1, le=65535)
    head_cpus: float = Field(2, gt=0)
    worker_cpus: float = Field(1, gt=0)  # per extra worker node; `--worker-cpus 1,2` gives each its own
    object_store_mb: int = Field(256, ge=64)  # per node


class ClusterConfig(Strict):
    address: str | None = None  # None: start a Ray of this process's own; "auto" or ray://... to join a running one
    num_cpus: int | None = Field(None, ge=1)  # for a local Ray started by a stage
    loopback: bool = True  # a local Ray started by a stage listens on 127.0.0.1 only; false: all interfaces
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    local: LocalClusterConfig = LocalClusterConfig()


class MlflowConfig(Strict):
    tracking_uri: str | None = None  # None: a local SQLite store under train.run_dir
    experiment: str = "cxr"


class Config(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    ood: OodConfig = OodConfig()
    serve: ServeConfig = ServeConfig()
    export: ExportConfig = ExportConfig()
    cluster: ClusterConfig = ClusterConfig()
    mlflow: MlflowConfig = MlflowConfig()

    def with_absolute_paths(self) -> Config:
        """A copy whose paths are absolute: Ray workers run in other working directories than the driver."""
        tree = self.model_dump(mode="json")
        root = project_root()
        dirs = [("data", "nih_dir"), ("data", "covid_dir"), ("data", "shards_dir"), ("train", "run_dir")]
        for section, key in [*dirs, ("export", "out_dir")]:
            tree[section][key] = str((root / tree[section][key]).resolve())
        if tree["data"]["pneumonia_dir"]:  # null stays null: it follows the (now absolute) nih_dir
            tree["data"]["pneumonia_dir"] = str((root / tree["data"]["pneumonia_dir"]).resolve())
        for role in ("cnn", "vit"):
            if tree["model"][role]["pretrained"]:
                tree["model"][role]["pretrained"] = str((root / tree["model"][role]["pretrained"]).resolve())
            for key in ("checkpoint", "onnx_model"):
                if tree["serve"][role][key]:
                    tree["serve"][role][key] = str((root / tree["serve"][role][key]).resolve())
        return Config.model_validate(tree)


PROJECT_ROOT_ENV = "CXR_PROJECT_ROOT"


def project_root() -> Path:
    """What relative paths of the config are relative to: the working directory, or ``$CXR_PROJECT_ROOT``.

    A job submitted with ``--working-dir`` runs in Ray's unpacked copy of the code; ``cxr <stage> --address`` to a
    cluster on this machine sets the variable to the submitting checkout, so the job reads and writes its runs/."""
    return Path(os.environ.get(PROJECT_ROOT_ENV) or ".")
