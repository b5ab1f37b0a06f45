"""Bad uploads, limits and the API key answer JSON errors with the right status (the package's one app)."""

from __future__ import annotations

import io
import os

import pytest
import requests
from PIL import Image

from tests.helpers import API_KEY, APP_MAX_UPLOAD_MB, png, post

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"", 400, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, None),  # PNG signature, garbage after it
        (b"plain text is not an image", 415, "unsupported_type"),
        (b"GIF89a" + b"\0" * 64, 415, "unsupported_type"),
        (os.urandom(int(APP_MAX_UPLOAD_MB * 1024 * 1024) + 10), 413, "too_large"),
    ],
)
def test_bad_uploads_get_json_errors(served, payload, status, reason):
    answer = post(served, data=payload)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["status"] == status and (reason is None or error["reason"] == reason)


def test_decompression_bomb_is_413(served):
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # 25 Mpx, ~25 kB on the wire
    answer = post(served, data=buffer.getvalue())
    assert answer.status_code == 413 and "5000x5000" in answer.json()["error"]["detail"]


def test_truncated_png_and_bad_mode_are_400(served):
    assert post(served, data=png()[:500]).status_code == 400
    answer = post(served, data=png(), mode="fastest")
    assert answer.status_code == 400 and answer.json()["error"]["reason"] == "bad_mode"


def test_api_key_is_required(served):
    assert post(served, data=png(), headers={}).status_code == 401
    assert post(served, data=png(), headers={"X-API-Key": "wrong"}).json()["error"]["reason"] == "unauthorized"
    assert post(served, data=png(), headers={"Authorization": f"Bearer {API_KEY}"}, mode="cnn").status_code == 200
    assert requests.get(served["url"] + "/v1/model", timeout=10).status_code == 401
    assert requests.get(served["url"] + "/v1/health", timeout=10).status_code == 200  # probes carry no key
