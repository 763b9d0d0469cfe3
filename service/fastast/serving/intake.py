"""Reading an upload: multipart field `file` or the raw body, with the size limit enforced while reading.

The limit is checked against Content-Length before anything is read, and again on every chunk, so an oversized
(or chunked, length-less) upload is refused without ever being buffered whole.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from fastast.serving.errors import ServiceError

FILE_FIELD = "file"
RAW_MEDIA_TYPES = "audio/* or application/octet-stream"


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower case; '' when absent."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_raw_audio(media: str) -> bool:
    """A missing Content-Type counts as application/octet-stream (RFC 9110 allows a recipient to assume it)."""
    return media in ("", "application/octet-stream") or media.startswith("audio/")


async def read_upload(request: Request, limit: int) -> bytes:
    """The uploaded audio bytes; 413 past `limit`, 415 for other content types, 400 when empty or malformed."""
    media = media_type(request)
    if media != "multipart/form-data" and not is_raw_audio(media):
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"Content-Type {media!r} is not accepted: send the audio as multipart/form-data field '{FILE_FIELD}', "
            f"or as the raw body with Content-Type {RAW_MEDIA_TYPES}",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    stream = _limited(request, limit)
    data = await (_read_multipart(request, stream) if media == "multipart/form-data" else _read_all(stream))
    if not data:
        raise ServiceError(400, "empty_body", "the upload holds no audio (0 bytes)")
    return data


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


async def _read_all(stream: AsyncGenerator[bytes, None]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def _read_multipart(request: Request, stream: AsyncGenerator[bytes, None]) -> bytes:
    parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ServiceError(400, "invalid_multipart", f"malformed multipart/form-data: {exc.message}") from None
    try:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            raise ServiceError(400, "missing_file", f"multipart/form-data needs the audio as a file field named '{FILE_FIELD}'")
        return await upload.read()
    finally:
        await form.close()


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"the upload exceeds the limit of {limit / 1e6:g} MB")
