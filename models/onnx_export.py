"""PyTorch -> ONNX for our networks (one head per label space): export, metadata, parity, int8 quantisation.

Plain torch, onnx and onnxruntime (never ray). The ONNX model takes what ``CxrNet`` takes, uint8 ``image
[B, 1, S, S]`` with a dynamic batch axis, normalises inside the graph and returns one logits output per head, named
after it and in the model's head order (``<head> [B, classes]``). Its ``metadata_props`` carry what serving needs to
preprocess exactly like training (input and storage size, mean, std) and what it must agree with (arch, role, the
source checkpoint, and ``label_spaces``: the JSON list of ``LabelSpace.to_dict()`` in head order, from which the
ONNX backend rebuilds the heads and their sigmoid/softmax without the checkpoint).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). Measured with torch 2.14 on timm's
``efficientnet_b0``, ``vit_small_patch16_224``, ``test_efficientnet`` and ``test_vit``: both exporters give logits
within 2e-6 of PyTorch and run at the same speed in ONNX Runtime, and ORT's quantiser handles both graphs. The
TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9 and traces Python conditionals in timm's ViT
into constants (TracerWarnings); the dynamo exporter keeps the batch axis symbolic by construction
(``torch.export.Dim``) and is where fixes land. It costs a few seconds per export instead of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader

from models.checkpoint import label_spaces_of
from models.errors import CxrError
from models.labels import LabelSpace, spaces_from_dicts
from models.network import CxrNet

log = logging.getLogger(__name__)
for _chatty in ("onnxscript", "onnx_ir", "onnxruntime.quantization"):  # a line per graph pass at INFO
    logging.getLogger(_chatty).setLevel(logging.WARNING)

INPUT_NAME = "image"
METADATA_VERSION = "2"  # 2: label_spaces is a list of LabelSpace dicts, one output per head
# fields an ONNX file must share with the checkpoint a replica serves it beside (storage_size when both have it)
CHECKED_FIELDS = ("arch", "input_size", "mean", "std", "label_spaces", "storage_size")
QUANTIZE_MODES = ("dynamic", "static")


class OnnxExportError(CxrError, RuntimeError):
    """An export that failed a check (checker, parity); the message names the file and the figure."""


class OnnxMetadataError(CxrError, ValueError):
    """An ONNX file whose metadata does not match the checkpoint it is served with; names the file and field."""


# --------------------------------------------------------------------------------------------- export


def build_metadata(payload: dict[str, Any], source_checkpoint: str | Path, storage_size: int | None) -> dict[str, str]:
    """metadata_props of an export, from a checkpoint payload (or its meta.json); values are strings (JSON)."""
    pre = payload["preprocessing"]
    spaces = [space.to_dict() for space in label_spaces_of(payload)]  # refuses checkpoints older than the registry
    return {
        "cxr_metadata_version": METADATA_VERSION,
        "arch": str(payload["arch"]),
        "role": str(payload.get("role", "")),
        "input_size": str(int(pre["input_size"])),
        "storage_size": "" if storage_size is None else str(int(storage_size)),
        "channels": "1",
        "input_dtype": "uint8",
        "mean": repr(float(pre["mean"])),
        "std": repr(float(pre["std"])),
        "label_spaces": json.dumps(spaces),
        "source_checkpoint": str(source_checkpoint),
        "quantize": "none",
    }


def output_names(spaces: Iterable[LabelSpace]) -> tuple[str, ...]:
    """The graph's outputs: one per head, named after it, in head order."""
    return tuple(space.head for space in spaces)


def metadata_label_spaces(path: str | Path, metadata: dict[str, str]) -> tuple[LabelSpace, ...]:
    """The label spaces an export's metadata carries (``OnnxMetadataError`` for exports that predate them)."""
    raw = metadata.get("label_spaces")
    found = json.loads(raw) if raw else None
    if not isinstance(found, list):
        raise OnnxMetadataError(f"{path}: metadata has no label_spaces list (an older export); export it again")
    return spaces_from_dicts(found)


def session_label_spaces(session: ort.InferenceSession) -> tuple[LabelSpace, ...]:
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return metadata_label_spaces("<session>", metadata)


def export_onnx(model: CxrNet, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis and ``metadata``, then run ``onnx.checker`` on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # a batch of 2 as the example: torch.export would specialise a batch of 1 into a constant
    example = torch.zeros((2, 1, model.input_size, model.input_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(output_names(model.label_spaces)),
        dynamic_shapes={"images": {0: batch}},
        external_data=False,
        optimize=True,
        verbose=False,
    )
    write_metadata(path, metadata)
    check_model(path)
    return path


def check_model(path: str | Path) -> None:
    """``onnx.checker`` with full shape inference; also that the graph has our input and one output per head of
    the label spaces in its metadata, in order."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise OnnxExportError(f"{path}: onnx.checker failed: {err}") from None
    model = onnx.load(str(path), load_external_data=False)
    expected = output_names(metadata_label_spaces(path, {p.key: p.value for p in model.metadata_props}))
    inputs, outputs = [i.name for i in model.graph.input], tuple(o.name for o in model.graph.output)
    if inputs != [INPUT_NAME] or outputs != expected:
        raise OnnxExportError(f"{path}: inputs {inputs} / outputs {outputs}, expected [{INPUT_NAME}] / {expected}")


def write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def check_metadata(path: str | Path, found: dict[str, str], expected: dict[str, str]) -> None:
    """Raise ``OnnxMetadataError`` naming ``path`` and the first field where ``found`` differs from ``expected``."""
    for field in CHECKED_FIELDS:
        want, got = expected.get(field, ""), found.get(field)
        if field == "storage_size" and (not want or not got):
            continue
        if got is None:
            raise OnnxMetadataError(f"{path}: metadata has no field {field!r}; re-export it with `cxr export`")
        if field == "label_spaces":
            same = json.loads(got) == json.loads(want)
        elif field in ("mean", "std"):
            same = abs(float(got) - float(want)) <= 1e-7
        else:
            same = got == want
        if not same:
            raise OnnxMetadataError(
                f"{path}: metadata field {field!r} is {got!r} but the checkpoint has {want!r}: "
                "this ONNX file was exported from another model; export this checkpoint with `cxr export`"
            )


# ---------------------------------------------------------------------------------------- running it


def ort_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads`` intra-op threads (one replica's share of the machine), one inter-op thread."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers etc. are not ours to act on
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
    """{head: logits} in the graph's output order (the model's head order)."""
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(names, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8)})
    return dict(zip(names, outputs, strict=True))


def torch_logits(model: CxrNet, batch: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {name: value.float().numpy() for name, value in model(torch.from_numpy(batch)).items()}


def probabilities_from_logits(logits: dict[str, np.ndarray], spaces: Iterable[LabelSpace]) -> dict[str, np.ndarray]:
    """Each head's probabilities as its label space says (sigmoid or softmax), float32, in head order: what
    ``serve.replicas.probabilities`` returns."""
    return {
        space.head: space.probabilities(torch.from_numpy(np.asarray(logits[space.head]))).numpy().astype(np.float32)
        for space in spaces
    }


def logit_parity(model: CxrNet, session: ort.InferenceSession, batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Max absolute logit difference ONNX vs PyTorch per head and overall, over every image of ``batches``."""
    heads = output_names(model.label_spaces)
    worst = dict.fromkeys(heads, 0.0)
    images = 0
    for batch in batches:
        expected, found = torch_logits(model, batch), onnx_logits(session, batch)
        for name in heads:
            worst[name] = max(worst[name], float(np.abs(expected[name] - found[name]).max()))
        images += len(batch)
    return {"images": images, "max_abs_logit_diff": max(worst.values()), "per_head": worst}


def agreement_key(space: LabelSpace) -> str:
    """The key of a head's agreement figure: ``<head>_finding_agreement`` (multi-label: every class's yes/no at
    0.5) or ``<head>_top1_agreement`` (multi-class: the top class)."""
    return f"{space.head}_finding_agreement" if space.multi_label else f"{space.head}_top1_agreement"


def agreement(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, batches: Iterable[np.ndarray]
) -> dict[str, Any]:
    """How far ``candidate`` (int8) answers from ``reference`` (fp32): probabilities and logits overall, and per head
    (``agreement_key``) the share of top classes (multi-class) or of class decisions at 0.5 (multi-label) that
    agree. The heads are those of the reference's metadata."""
    spaces = session_label_spaces(reference)
    diffs: list[np.ndarray] = []
    agreed: dict[str, list[np.ndarray]] = {agreement_key(space): [] for space in spaces}
    worst_logit, images = 0.0, 0
    for batch in batches:
        ref_logits, cand_logits = onnx_logits(reference, batch), onnx_logits(candidate, batch)
        worst_logit = max(worst_logit, *(float(np.abs(ref_logits[s.head] - cand_logits[s.head]).max()) for s in spaces))
        ref, cand = probabilities_from_logits(ref_logits, spaces), probabilities_from_logits(cand_logits, spaces)
        for space in spaces:
            r, c = ref[space.head], cand[space.head]
            diffs.append(np.abs(r - c).ravel())
            same = ((r >= 0.5) == (c >= 0.5)).ravel() if space.multi_label else r.argmax(axis=1) == c.argmax(axis=1)
            agreed[agreement_key(space)].append(same)
        images += len(batch)
    diff = np.concatenate(diffs)
    return {
        "images": images,
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "max_abs_logit_diff": worst_logit,
        **{key: float(np.concatenate(parts).mean()) for key, parts in agreed.items()},
    }


# ------------------------------------------------------------------------------------------- int8


class _BatchReader(CalibrationDataReader):
    """ORT's calibration input: uint8 image batches, one ``get_next`` at a time."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8)}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantiser logs a line per tensor to the root logger at INFO; keep those out of the stage's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(
    source: str | Path,
    target: str | Path,
    mode: str,
    calibration: Iterable[np.ndarray] | None = None,
    op_types: list[str] | None = None,
) -> Path:
    """An int8 copy of the fp32 ``source`` with its metadata (``quantize`` set to ``mode``).

    ``dynamic``: int8 weights, activations quantised at run time. ``static``: QDQ, per-channel int8 weights, uint8
    activations with MinMax ranges from ``calibration`` (uint8 image batches). ``op_types``: the op types to
    quantise (None or empty: every op type ORT can).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    target = Path(target)
    metadata = read_metadata(source)
    with tempfile.TemporaryDirectory() as scratch, _quiet_root_logger():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference + graph folding, as ORT recommends
        if mode == "dynamic":
            quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, op_types_to_quantize=op_types or None)
        else:
            if calibration is None:
                raise ValueError("static quantisation needs calibration batches")
            quantize_static(
                prepared,
                target,
                _BatchReader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=op_types or None,
            )
    write_metadata(target, {**metadata, "quantize": mode})
    check_model(target)
    return target
