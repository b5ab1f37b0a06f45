"""A client that hangs up in the middle of its upload: the router answers nothing, logs no traceback, and keeps
answering the next request.

Self-contained: its own small Serve app (the session's tiny checkpoints) on the session's local Ray, shut down at
the end of the module. A raw socket sends the headers with a large ``Content-Length`` and only part of the body,
then closes; the test reads what Ray's log files (the session's ``logs/``, Serve's and the workers' own) gained
meanwhile and fails on a ``ClientDisconnect`` traceback or an asyncio "Future exception was never retrieved".
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.helpers import png

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DECLARED_BYTES = 400_000  # under the app's limit, so the router starts reading the body
SENT_BYTES = 4_096
# A traceback through our body reader, Starlette's exception, and asyncio's complaint about a future that ended
# with an exception nobody awaited (Serve's call of the app, when the app raised after the proxy gave up on it).
CHATTER = ("ClientDisconnect", "Future exception was never retrieved", "in read_uploads", "in read_body")
SETS = [
    "serve.max_upload_mb=1",
    "serve.request_timeout_s=20",
    "serve.router={num_cpus: 0.2, max_ongoing_requests: 8, max_queued_requests: 16}",
    "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.2, num_gpus: 0}",
    "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.2, num_gpus: 0}",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(ray_session, tiny_checkpoints):
    from ray import serve

    from pipelines.config import load_config
    from serve.app import build_app

    cfg = load_config(None, sets=SETS)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, tiny_checkpoints["cnn"], tiny_checkpoints["vit"]), name="disconnect", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/v1/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the app never became ready"
        time.sleep(0.5)
    yield url
    serve.shutdown()


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
        f"Content-Length: {DECLARED_BYTES}\r\nX-Request-ID: {uuid.uuid4()}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\x89PNG" + b"\0" * (SENT_BYTES - 4))
        time.sleep(1.0)  # the router is now waiting inside request.stream() for the rest of the body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/predict", "application/octet-stream"), ("/v1/predict/batch", "multipart/form-data; boundary=xyz")],
)
def test_client_hanging_up_mid_upload_leaves_no_traceback(app_url, ray_session, path, content_type):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    before = _log_sizes(logs)
    _hang_up_mid_upload(app_url, path, content_type)

    answer = requests.post(f"{app_url}/v1/predict", data=png(64), timeout=60)
    assert answer.status_code == 200, answer.text
    time.sleep(3.0)  # worker stderr and Serve's file handlers flush line by line; give them a moment
    grown = _new_log_text(logs, before)
    found = {str(p.relative_to(logs)): [w for w in CHATTER if w in text] for p, text in grown.items()}
    found = {name: words for name, words in found.items() if words}
    assert not found, f"a disconnect left a traceback in Ray's logs: {found}"
