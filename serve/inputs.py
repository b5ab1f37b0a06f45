"""Turning uploaded bytes into one grayscale uint8 radiograph, or a rejection with an HTTP status and a reason.

Pure functions (no ray, no disk, no logging of image content). PNG and JPEG go through the same decoder as
ingest (``pipelines.data.imaging.decode_gray``); DICOM goes through pydicom. Every size limit is checked from the
header before pixels are decoded, so a decompression bomb is refused without being expanded.

Statuses: 400 malformed (empty, truncated, corrupt), 413 too large (bytes or pixels), 415 not a supported
image (unknown format, other DICOM modality, unsupported encoding).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipelines.data.imaging import ImageDecodeError, decode_gray, sniff_format

DICOM_MAGIC_OFFSET = 128  # the DICOM preamble is 128 bytes, then "DICM"
DICOM_MAGIC = b"DICM"

# Signatures of image formats we recognise but do not accept, so the caller learns what it sent.
OTHER_SIGNATURES = {
    b"GIF8": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"RIFF": "webp",
    b"%PDF": "pdf",
}

# ImageDecodeError reasons of pipelines.data.imaging -> HTTP status
_STATUS_BY_REASON = {
    "empty": 400,
    "truncated": 400,
    "corrupt": 400,
    "not_an_image": 415,
    "unsupported_mode": 415,
    "too_large": 413,
}


class InputRejected(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status, ``reason`` a short machine-readable tag."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail

    def as_json(self) -> dict[str, object]:
        return {"error": {"status": self.status, "reason": self.reason, "detail": self.detail}}


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int
    max_pixels: int
    dicom_modalities: frozenset[str]

    @classmethod
    def from_serve_config(cls, max_upload_mb: float, max_pixels: int, modalities: Iterable[str]) -> InputLimits:
        return cls(int(max_upload_mb * 1024 * 1024), max_pixels, frozenset(m.upper() for m in modalities))


def detect_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom', another known image format's name, or None."""
    found = sniff_format(data)
    if found:
        return found
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    for signature, name in OTHER_SIGNATURES.items():
        if data.startswith(signature):
            return name
    return None


def decode_upload(data: bytes, limits: InputLimits) -> tuple[np.ndarray, str]:
    """Bytes of one upload -> (grayscale uint8 pixels [H, W], format). Raises ``InputRejected``."""
    if not data:
        raise InputRejected(400, "empty", "the request carried no image bytes")
    if len(data) > limits.max_bytes:
        raise InputRejected(413, "too_large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    kind = detect_format(data)
    if kind == "dicom":
        return decode_dicom(data, limits), kind
    if kind not in ("png", "jpeg"):
        what = f"{kind} images are" if kind else "the bytes are neither PNG, JPEG nor DICOM, which is"
        raise InputRejected(415, "unsupported_type", f"{what} not supported")
    try:
        pixels, _mode = decode_gray(data, max_pixels=limits.max_pixels)
    except ImageDecodeError as err:
        raise InputRejected(_STATUS_BY_REASON.get(err.reason, 400), err.reason, err.detail) from None
    if min(pixels.shape) < 1:
        raise InputRejected(400, "corrupt", f"image of shape {pixels.shape}")
    return pixels, kind


# --------------------------------------------------------------------------------------------- DICOM


def decode_dicom(data: bytes, limits: InputLimits) -> np.ndarray:
    """A single-frame monochrome projection radiograph -> uint8, MONOCHROME1 inverted so bone is bright."""
    import pydicom  # imported on first DICOM only: most requests are PNG
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as err:
        raise InputRejected(400, "corrupt", f"DICOM header does not parse: {type(err).__name__}") from None
    _check_dicom_header(header, limits)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in dataset and "FloatPixelData" not in dataset:
            raise InputRejected(400, "no_pixels", "the DICOM file holds no pixel data")
        pixels = dataset.pixel_array
    except InputRejected:
        raise
    except (NotImplementedError, RuntimeError) as err:
        syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InputRejected(415, "unsupported_encoding", f"cannot decode transfer syntax {syntax}: {err}") from None
    except (EOFError, ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        reason = "truncated" if "length" in str(err).lower() or isinstance(err, EOFError) else "corrupt"
        raise InputRejected(400, reason, f"DICOM pixel data does not decode: {type(err).__name__}") from None
    return _window_to_uint8(dataset, np.asarray(pixels))


def _check_dicom_header(header, limits: InputLimits) -> None:
    modality = str(header.get("Modality", "")).upper()
    if modality not in limits.dicom_modalities:
        allowed = ", ".join(sorted(limits.dicom_modalities))
        raise InputRejected(415, "modality_not_allowed", f"modality {modality or 'missing'!r}; accepted: {allowed}")
    rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if rows < 1 or columns < 1:
        raise InputRejected(400, "corrupt", f"DICOM size {rows}x{columns}")
    if rows * columns * frames > limits.max_pixels:
        raise InputRejected(413, "too_large", f"{columns}x{rows}x{frames} pixels exceeds {limits.max_pixels}")
    if frames != 1:
        raise InputRejected(415, "multi_frame", f"{frames} frames; one radiograph per request")
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputRejected(415, "unsupported_photometric", f"{photometric or 'missing'}; radiographs are monochrome")


def _window_to_uint8(dataset, pixels: np.ndarray) -> np.ndarray:
    """Modality LUT, then the file's own VOI window when it has one, else min-max (as 16-bit PNGs in ingest)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
        values = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros(values.shape, np.float64) if high <= low else (values - low) * (255.0 / (high - low))
    gray = np.round(scaled).astype(np.uint8)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 shows low values bright; training images have bright bone
    return gray
