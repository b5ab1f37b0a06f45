"""The upload page: ``GET /`` answers ``serve/web/index.html``; ``/static/*`` its scripts and styles (no CDN)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")


async def index(request: Request) -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


def web_routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    ]
