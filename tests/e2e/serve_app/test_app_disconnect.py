"""A client that hangs up in the middle of its upload: the router answers nothing, logs no traceback, and keeps
answering the next request.

On the package's app (conftest.py). A raw socket sends the headers with a large ``Content-Length`` (under the app's
upload limit, so the router starts reading the body) and only part of the body, then closes; the test reads what
Ray's log files (the session's ``logs/``, Serve's and the workers' own) gained meanwhile and fails on a
``ClientDisconnect`` traceback or an asyncio "Future exception was never retrieved".
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.helpers import API_KEY, APP_MAX_UPLOAD_MB, HEADERS, png

DECLARED_BYTES = int(APP_MAX_UPLOAD_MB * 1024 * 1024 * 0.75)  # under the app's limit: the router reads the body
SENT_BYTES = 4_096
# A traceback through our body reader, Starlette's exception, and asyncio's complaint about a future that ended
# with an exception nobody awaited (Serve's call of the app, when the app raised after the proxy gave up on it).
CHATTER = ("ClientDisconnect", "Future exception was never retrieved", "in read_uploads", "in read_body")


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in logs.rglob("*") if path.is_file()}


def _new_log_text(logs: Path, before: dict[Path, int]) -> dict[Path, str]:
    """What each log file under ``logs`` gained since ``before`` (a new file: all of it)."""
    grown = {}
    for path, size in _log_sizes(logs).items():
        start = before.get(path, 0)
        if size > start:
            with path.open("rb") as handle:
                handle.seek(start)
                grown[path] = handle.read().decode("utf-8", errors="replace")
    return grown


def _hang_up_mid_upload(url: str, path: str, content_type: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {DECLARED_BYTES}\r\nX-API-Key: {API_KEY}\r\nX-Request-ID: {uuid.uuid4()}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\x89PNG" + b"\0" * (SENT_BYTES - 4))
        time.sleep(1.0)  # the router is now waiting inside request.stream() for the rest of the body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/predict", "application/octet-stream"), ("/v1/predict/batch", "multipart/form-data; boundary=xyz")],
)
def test_client_hanging_up_mid_upload_leaves_no_traceback(served, ray_session, path, content_type):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    before = _log_sizes(logs)
    _hang_up_mid_upload(served["url"], path, content_type)

    answer = requests.post(f"{served['url']}/v1/predict", data=png(64), headers=HEADERS, timeout=60)
    assert answer.status_code == 200, answer.text
    time.sleep(3.0)  # worker stderr and Serve's file handlers flush line by line; give them a moment
    grown = _new_log_text(logs, before)
    found = {str(p.relative_to(logs)): [w for w in CHATTER if w in text] for p, text in grown.items()}
    found = {name: words for name, words in found.items() if words}
    assert not found, f"a disconnect left a traceback in Ray's logs: {found}"
