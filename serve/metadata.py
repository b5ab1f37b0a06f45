"""Patient metadata of a request (age, sex, view position) for models with the fusion head (``models/metadata.py``).

Where each field comes from, first found wins:

1. the request: multipart form fields ``age``, ``sex``, ``view_position`` (next to the file parts), or query
   parameters of the same names (for raw-body uploads); one field given both ways is a 400 (no silent precedence);
2. a DICOM upload's header: ``PatientAge`` ("058Y", also days/weeks/months), ``PatientSex``, ``ViewPosition``;
3. otherwise the field is missing, and the model reads its "missing" flag.

Fields the caller typed are validated (400 ``bad_metadata`` naming the field): a typo treated as missing would
answer as if nothing had been sent, without saying so. Header values are not: modalities write what they write, and
training counted unreadable values (a lateral view, an odd age) as missing, so serving does the same. Blank form
fields count as absent, since HTML forms send every field.

Pure functions, no ray; pydicom only for DICOM uploads.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from models import metadata as patient_metadata
from serve.inputs import InputLimits, InputRejected, decode_upload

FIELDS = ("age", "sex", "view_position")
MAX_AGE = 130.0  # the encoder's own bound (models.metadata): older ages would be encoded as missing
_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
_VIEWS = ("PA", "AP")
# DICOM Age String: three digits and a unit (D, W, M, Y); converted to years as the encoder reads them
_DICOM_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_DICOM_TAGS = ("PatientAge", "PatientSex", "ViewPosition")


@dataclass(frozen=True)
class PatientMetadata:
    """The values one image is answered with (None: missing) and where they came from:
    ``source`` is ``request``, ``dicom``, ``request+dicom`` (some fields from each) or ``none``."""

    age: float | None = None
    sex: str | None = None  # "M" | "F"
    view_position: str | None = None  # "PA" | "AP"
    source: str = "none"

    def vector(self) -> np.ndarray:
        """The fusion head's input row (float32, ``models.metadata.FEATURES``); also the result cache's key part."""
        return patient_metadata.encode(self.age, self.sex, self.view_position)

    def as_json(self, used_by: list[str]) -> dict[str, Any]:
        """The answer's ``metadata`` object; ``used_by``: the answering roles whose model has the fusion head."""
        age = self.age
        if age is not None and float(age).is_integer():
            age = int(age)  # 58, not 58.0, for the common whole-year ages
        return {
            "age": age,
            "sex": self.sex,
            "view_position": self.view_position,
            "source": self.source,
            "used_by": list(used_by),
        }


def _bad(field: str, detail: str) -> InputRejected:
    return InputRejected(400, "bad_metadata", f"{field}: {detail}")


def _given(value: Any) -> bool:
    return value is not None and bool(str(value).strip())


def _parse_age(raw: str) -> float:
    try:
        age = float(raw)
    except ValueError:
        raise _bad("age", f"must be a number of years, got {raw!r}") from None
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE:
        raise _bad("age", f"must be between 0 and {MAX_AGE:g} years, got {raw!r}")
    return age


def _parse_sex(raw: str) -> str:
    sex = _SEXES.get(raw.upper())
    if sex is None:
        raise _bad("sex", f"must be M or F, got {raw!r}")
    return sex


def _parse_view(raw: str) -> str:
    view = raw.upper()
    if view not in _VIEWS:
        raise _bad("view_position", f"must be PA or AP (other views count as missing: leave it out), got {raw!r}")
    return view


_PARSERS = {"age": _parse_age, "sex": _parse_sex, "view_position": _parse_view}


def request_fields(form: Mapping[str, str], query: Mapping[str, str]) -> dict[str, Any]:
    """The request's own fields, validated: ``{field: value}`` for those given. Raises ``InputRejected`` 400
    ``bad_metadata`` naming the field for an invalid value or a field sent both as form field and query parameter."""
    found: dict[str, Any] = {}
    for name in FIELDS:
        in_form, in_query = _given(form.get(name)), _given(query.get(name))
        if in_form and in_query:
            raise _bad(name, "given both as a form field and as a query parameter; send it once")
        if in_form or in_query:
            raw = str(form.get(name) if in_form else query.get(name)).strip()
            found[name] = _PARSERS[name](raw)
    return found


def _header_age(value: Any) -> float | None:
    text = str(value).strip().upper()
    match = _DICOM_AGE.match(text)
    try:
        age = int(match.group(1)) * _YEARS_PER_UNIT[match.group(2)] if match else float(text)
    except ValueError:
        return None
    return age if math.isfinite(age) and 0.0 <= age <= MAX_AGE else None


def header_fields(header: Any) -> dict[str, Any]:
    """Age (years), sex and view position from a pydicom dataset; absent or unreadable values are left out."""
    found: dict[str, Any] = {}
    values = {tag: header.get(tag) for tag in _DICOM_TAGS}
    if _given(values["PatientAge"]) and (age := _header_age(values["PatientAge"])) is not None:
        found["age"] = age
    if _given(values["PatientSex"]) and (sex := _SEXES.get(str(values["PatientSex"]).strip().upper())):
        found["sex"] = sex
    view = str(values["ViewPosition"]).strip().upper() if _given(values["ViewPosition"]) else ""
    if view in _VIEWS:
        found["view_position"] = view
    return found


def dicom_fields(data: bytes) -> dict[str, Any]:
    """``header_fields`` of a DICOM upload's bytes; a header that does not parse gives nothing (all missing)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
        return header_fields(header)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError):
        return {}


def resolve(explicit: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> PatientMetadata:
    """Per field: the request's value, else the DICOM header's, else missing."""
    values: dict[str, Any] = {}
    sources: set[str] = set()
    for name in FIELDS:
        for kind, given in (("request", explicit), ("dicom", header or {})):
            if name in given:
                values[name] = given[name]
                sources.add(kind)
                break
    source = "+".join(kind for kind in ("request", "dicom") if kind in sources) or "none"
    return PatientMetadata(**values, source=source)


def decode_with_metadata(
    data: bytes, limits: InputLimits, explicit: Mapping[str, Any]
) -> tuple[np.ndarray, str, PatientMetadata]:
    """``decode_upload`` plus the image's metadata; the DICOM header is read only when the request left a field
    out (one call, so the router runs both in one worker thread)."""
    gray, image_format = decode_upload(data, limits)
    header = dicom_fields(data) if image_format == "dicom" and set(FIELDS) - set(explicit) else None
    return gray, image_format, resolve(explicit, header)
