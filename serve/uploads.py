"""Reading uploads from an HTTP request with hard size limits, entirely in memory.

A declared ``Content-Length`` over the limit is refused before a byte is read; a body that streams past it is cut
off there. Multipart bodies are parsed with Starlette's parser, but with its spool limit raised to the body limit,
so an uploaded file never rolls over into a temporary file on disk (Starlette's default spills above 1 MB).

A client that hangs up mid-upload is an ordinary event, not a server error: the read ends in a 400
``client_disconnected`` (which nobody receives) and one short log line, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import TaskCancelledError
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from serve.inputs import InputRejected

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the image bytes
# Text fields a multipart body may carry beside its files (the patient metadata: age, sex, view_position, with room
# for a few more); past it the parser refuses the body, so a flood of fields cannot be parsed into memory.
MAX_TEXT_FIELDS = 8
# How reading the body ends when the client hangs up: Starlette's ClientDisconnect once the Serve proxy passes on
# the disconnect, or Ray's TaskCancelledError when the proxy has already cancelled the request while the replica
# was still fetching body chunks from it (which one comes first is a race).
CLIENT_GONE = (ClientDisconnect, TaskCancelledError)


@dataclass
class Upload:
    """One image in a request: its bytes, or why it was refused before decoding (e.g. a part over the limit)."""

    filename: str | None
    data: bytes = b""
    rejected: InputRejected | None = None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise InputRejected(400, "bad_request", "Content-Length is not a number") from None
        if declared_bytes > limit:
            raise InputRejected(413, "too_large", f"{declared_bytes} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputRejected(413, "too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except CLIENT_GONE:
        log.info("client disconnected after %d of %s body bytes", size, declared or "unknown")
        raise InputRejected(400, "client_disconnected", "the client closed the connection mid-upload") from None
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
    yield b""


async def _multipart_parts(
    request: Request, body: bytes, max_files: int
) -> tuple[list[tuple[str | None, bytes]], dict[str, str]]:
    """(the file parts as (filename, bytes), the text fields by name: the last of a repeated name)."""
    parser = MultiPartParser(request.headers, _once(body), max_files=max_files, max_fields=max_files + MAX_TEXT_FIELDS)
    parser.spool_max_size = len(body) + 1  # keep every file in memory: nothing about an image touches the disk
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if "too many files" in str(err).lower():
            raise InputRejected(413, "too_many_images", f"at most {max_files} image(s) per request") from None
        raise InputRejected(400, "bad_multipart", str(err)) from None
    files, fields = [], {}
    try:
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename, await value.read()))
            else:
                fields[name] = value
    finally:
        await form.close()
    return files, fields


async def read_uploads(request: Request, max_bytes: int, max_images: int) -> list[Upload]:
    """The images of a request: every file part of a multipart body, or the raw body as one image."""
    return (await read_request(request, max_bytes, max_images))[0]


async def read_request(request: Request, max_bytes: int, max_images: int) -> tuple[list[Upload], dict[str, str]]:
    """(the images, as ``read_uploads``; the multipart body's text fields by name, empty for a raw body)."""
    content_type = request.headers.get("content-type", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    limit = max_bytes * max_images + (MULTIPART_OVERHEAD * max_images if multipart else 0)
    body = await read_body(request, limit)
    if not multipart:
        return [Upload(None, body)], {}
    files, fields = await _multipart_parts(request, body, max_images)
    if not files:
        raise InputRejected(400, "no_file", "multipart body holds no file part (send the image as a file field)")
    uploads = []
    for filename, data in files:
        too_big = len(data) > max_bytes
        rejected = InputRejected(413, "too_large", f"{len(data)} bytes exceeds {max_bytes}") if too_big else None
        uploads.append(Upload(filename, b"" if too_big else data, rejected))
    return uploads, fields
