"""Reading multipart uploads with the per-file size limit (the whole body is capped by middleware)."""

from __future__ import annotations

from fastapi import UploadFile

from app.core.errors import ProblemError


async def read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    """The file's bytes; 413 past ``max_bytes``, 422 when empty."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ProblemError(413, "file-too-large",
                           f"{field} is larger than the {max_bytes / 1048576:g} MiB limit.", field=field)
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    return data
