"""multipart/form-data bodies (edits, variations), read part by part under one byte limit.

The limit is the gateway's ``max_upload_bytes``, apart from ``max_body_bytes`` for JSON: the
whole body counts, files and fields together, and crossing it is a 413. What the files
are (format, size, mask) is the service's business: they go on as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import (
    BadContentDispositionHeader,
    BadContentDispositionParam,
    BodyPartReader,
    web,
)

from http_gateway.validation import BodyError

_CHUNK_BYTES = 256 * 1024
# What aiohttp warns of a part whose Content-Disposition it cannot parse (the part then has
# no name: a 400). The gateway ignores these warnings (log_redaction), which would print
# the caller's header; where warnings are errors, they arrive here as exceptions.
MALFORMED_PART_WARNINGS = (BadContentDispositionHeader, BadContentDispositionParam)


class UploadSlots:
    """How many uploads the gateway reads and sends to the service at once
    (``max_uploads_in_flight``).

    An upload is in memory from its first byte until gRPC has sent it on (then the gateway
    drops it: ``views.Handover``), up to about three times its size meanwhile; so this count
    times ``max_upload_bytes`` bounds what uploads can take. A request that finds no free
    slot is refused before its body is read: waiting for one would hold the connection, and
    reading it would hold the memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")
        self.message = str(self)


@dataclass
class Form:
    # Text fields by name (the last one wins, as in a query string).
    fields: dict[str, str] = field(default_factory=dict)
    # File fields by name, in the order they came.
    files: dict[str, list[bytes]] = field(default_factory=dict)

    def file_list(self, *names: str) -> list[bytes]:
        return [data for name in names for data in self.files.get(name, [])]


async def read_form(request: web.Request, *, limit: int, file_fields: frozenset[str]) -> Form:
    """The whole form; parts named in ``file_fields`` (or sent as files) are bytes.

    Raises UploadTooLarge past ``limit`` bytes and BodyError for a body that is not
    multipart/form-data or cannot be read."""
    if request.content_length is not None and request.content_length > limit:
        raise UploadTooLarge(limit)
    form = Form()
    if request.content_type == "application/x-www-form-urlencoded":
        # Text fields only (within max_body_bytes): the service then says what is missing.
        posted = await request.post()
        form.fields = {k: v for k, v in posted.items() if isinstance(v, str)}
        return form
    if request.content_type != "multipart/form-data":
        raise BodyError("The request body must be multipart/form-data.")
    total = 0
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader) or not part.name:
                raise BodyError("Every part of the form needs a name, and none may be nested.")
            chunks = []
            while chunk := await part.read_chunk(_CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    raise UploadTooLarge(limit)
                chunks.append(chunk)
            data = b"".join(chunks)
            # The pieces go now, not once the next part has been read too.
            del chunks
            if part.name in file_fields or part.filename is not None:
                form.files.setdefault(part.name, []).append(data)
                continue
            try:
                form.fields[part.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise BodyError(f"'{part.name}' must be UTF-8 text.", part.name) from None
    except (ValueError, AssertionError, RuntimeError, *MALFORMED_PART_WARNINGS) as exc:
        if isinstance(exc, BodyError):
            raise
        raise BodyError("The multipart body could not be read.") from None
    return form
