"""Receiving one upload: the multipart body streamed straight to a file beside its final place
(nothing spooled elsewhere, cut off at the size limit), then the content checks an upload must
pass before it is accepted (UTF-8, JSON Lines of objects). jobs/files.py owns the routes.

Starlette's own form parser is not used: it reads the whole body into a temporary file outside
the jobs folder before the route runs, so the upload limit could only be checked afterwards.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from tunesmith.serve import protocol as p

FORM_OVERHEAD = 64 << 10    # multipart boundaries, part headers and the purpose field, bytes
MAX_FIELD_BYTES = 1024      # a text field (purpose)
MAX_NAME_CHARS = 255        # a filename as shown back
GZIP_MAGIC = b"\x1f\x8b"


def body_limit(max_upload_bytes: int) -> int:
    """The largest request body an upload of at most `max_upload_bytes` can need (the Guard's
    body_limits entry for /v1/files)."""
    return max_upload_bytes + FORM_OVERHEAD


def display_name(raw: str) -> str:
    """The client's filename as text to show: control and format characters (newlines, NUL,
    bidi overrides) dropped, length capped. It is stored and shown, never used in a path."""
    name = "".join(ch for ch in raw if unicodedata.category(ch)[0] != "C").strip()
    return name[:MAX_NAME_CHARS] or "upload.jsonl"


def too_large(limit: int) -> p.APIError:
    return p.APIError(413, f"the file is over this server's upload limit of {limit} bytes (--max-upload-mb); "
                      "split it or start the server with a larger limit", param="file", code="file_too_large")


@dataclass
class Form:
    """What a multipart body held: text fields and the one file's name and size."""
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    file_bytes: int = 0


class _Receiver:
    """python-multipart callbacks: the part named `file` goes to `out`, text fields to Form.fields."""

    def __init__(self, out: BinaryIO, max_file_bytes: int):
        self.out, self.max_file_bytes, self.form = out, max_file_bytes, Form()
        self._headers: dict[bytes, bytes] = {}
        self._hname = self._hvalue = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def part_begin(self) -> None:
        self._headers, self._value, self._name, self._is_file = {}, bytearray(), None, False

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname = self._hvalue = b""

    def headers_finished(self) -> None:
        kind, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if kind != b"form-data" or name is None:
            raise p.APIError(400, "a multipart part has no 'Content-Disposition: form-data; name=...' header")
        self._name = name.decode("utf-8", "replace")
        self._is_file = b"filename" in params
        if self._is_file:
            if self._name != "file":
                raise p.APIError(400, f"unexpected file field {self._name!r}; send the data as the field 'file'",
                                 param=self._name)
            if self.form.filename is not None:
                raise p.APIError(400, "more than one 'file' in the form; upload one file per request", param="file")
            self.form.filename = display_name(params[b"filename"].decode("utf-8", "replace"))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.form.file_bytes += end - start
            if self.form.file_bytes > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            self.out.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise p.APIError(400, f"form field {self._name!r} is over {MAX_FIELD_BYTES} bytes", param=self._name)

    def part_end(self) -> None:
        if not self._is_file:
            if self._name in self.form.fields:
                raise p.APIError(400, f"form field {self._name!r} is given twice", param=self._name)
            try:
                self.form.fields[self._name] = bytes(self._value).decode("utf-8")
            except UnicodeDecodeError:
                raise p.APIError(400, f"form field {self._name!r} is not UTF-8 text", param=self._name) from None


async def receive_form(request, out: BinaryIO, max_file_bytes: int) -> Form:
    """Stream a multipart/form-data body: the `file` part is written to `out` as it arrives; a
    body (declared or not) over body_limit, or a file over `max_file_bytes`, stops the read
    with a 413 at once."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise p.APIError(415, "upload a file as multipart/form-data with the fields 'file' and 'purpose' (got "
                         f"{ctype.decode('latin-1') or 'no content type'!r})", code="unsupported_media_type")
    receiver = _Receiver(out, max_file_bytes)
    try:
        parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    except Exception as exc:  # noqa: BLE001 - python-multipart's FormParserError: a bad boundary
        raise p.APIError(400, f"invalid multipart boundary: {exc}") from None
    limit, size = body_limit(max_file_bytes), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(max_file_bytes)
            _feed(parser, chunk)
        _feed(parser, None)
    except ClientDisconnect:
        raise p.APIError(400, "the client disconnected while sending the file") from None
    if parser.state != MultipartState.END:  # python-multipart's finalize() does not check it
        raise p.APIError(400, "the multipart body ends before its closing boundary; the upload is incomplete")
    return receiver.form


def _feed(parser: MultipartParser, chunk: bytes | None) -> None:
    try:
        parser.write(chunk) if chunk is not None else parser.finalize()
    except p.APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - MultipartParseError and kin: a malformed body
        raise p.APIError(400, f"malformed multipart body: {exc}") from None


def _bad_line(lineno: int, why: str) -> p.APIError:
    return p.APIError(400, f"line {lineno}: {why}; a fine-tune file must be JSON Lines: one JSON object per line, "
                      "UTF-8 encoded", param="file", code="invalid_file_format")


def check_jsonl(path) -> int:
    """The number of records of an uploaded file, or an APIError naming the first line that is
    not UTF-8 or not a JSON object. Rows that are objects but no known data format are the
    audit's business: they are listed there with their line numbers, not refused here."""
    records = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(GZIP_MAGIC):
                raise _bad_line(1, "the file is gzip-compressed; upload the uncompressed .jsonl")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad_line(lineno, f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a BOM from Windows editors
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _bad_line(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise _bad_line(lineno, "JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise _bad_line(lineno, f"a record must be a JSON object, got {type(record).__name__}")
            records += 1
    if not records:
        raise p.APIError(400, "the file holds no records; a fine-tune file needs at least one JSON object per line",
                         param="file", code="invalid_file_format")
    return records
