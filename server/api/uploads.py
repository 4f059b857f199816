"""Streaming multipart parser for adapter uploads: files go straight into a staging folder, each size-bounded."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13 names its module `multipart`
    from multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from .errors import APIError

CONFIG, WEIGHTS, TOKENIZER = "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"
FILES = (CONFIG, WEIGHTS, TOKENIZER)
MAX_FIELD_BYTES = 1024  # the only form field is the adapter id
MAX_PARTS = 8
FLUSH_BYTES = 1 << 20  # file data is written from a worker thread in batches of about this much


class _Sink:
    """python-multipart callbacks: file parts stream to staged/<name>, the id field is kept in memory."""

    def __init__(self, staged: Path, weights_limit: int, side_limit: int):
        self.staged, self.weights_limit, self.side_limit = staged, weights_limit, side_limit
        self.fields: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.pending: list[tuple[object, bytes]] = []
        self.pending_bytes = 0
        self.parts = 0
        self._files: list = []
        self._reset()

    def _reset(self) -> None:
        self._hname, self._hvalue, self._disposition = b"", b"", b""
        self._name = self._file = None
        self._field = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._reset, "on_header_field": self._on_hfield, "on_header_value": self._on_hvalue,
                "on_header_end": self._on_hend, "on_headers_finished": self._on_headers, "on_part_data": self._on_data,
                "on_part_end": self._on_end}

    def _on_hfield(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _on_hvalue(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _on_hend(self) -> None:
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def _on_headers(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise APIError(400, f"the upload has more than {MAX_PARTS} parts", "file")
        _, opts = parse_options_header(self._disposition)
        key = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in opts:
            if key != "id":
                raise APIError(400, f"unexpected form field {key[:64]!r}; the only field is id", key[:64] or None)
            self._name = None
            return
        filename = os.path.basename(opts[b"filename"].decode("utf-8", "replace"))
        name = key if key in FILES else filename
        if name not in FILES:
            raise APIError(400, f"unexpected file {(name or key)[:64]!r}; send {CONFIG}, {WEIGHTS} and "
                                f"optionally {TOKENIZER}", "file")
        if name in self.sizes:
            raise APIError(400, f"{name} was sent twice", "file")
        self._name, self.sizes[name] = name, 0
        self._file = open(self.staged / name, "xb")  # a fresh name in a fresh folder
        self._files.append(self._file)

    def _on_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._name is None:
            self._field += chunk
            if len(self._field) > MAX_FIELD_BYTES:
                raise APIError(400, f"the form field id is longer than {MAX_FIELD_BYTES} bytes", "id")
            return
        self.sizes[self._name] += len(chunk)
        limit = self.weights_limit if self._name == WEIGHTS else self.side_limit
        if self.sizes[self._name] > limit:
            raise APIError(413, f"{self._name} has more than {limit} bytes, the limit", "file", "adapter_too_large")
        self.pending.append((self._file, chunk))
        self.pending_bytes += len(chunk)

    def _on_end(self) -> None:
        if self._name is None:
            self.fields["id"] = self._field.decode("utf-8", "replace")
        self._reset()

    def flush(self) -> None:
        """Write what the parser produced (on a worker thread)."""
        for f, chunk in self.pending:
            f.write(chunk)
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        for f in self._files:
            f.close()


async def read_upload(request, staged: Path, weights_limit: int, side_limit: int, body_limit: int
                      ) -> tuple[str | None, set[str]]:
    """Stream a multipart upload into `staged`: -> (id form field or None, names of the files written)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise APIError(400, f"upload an adapter as multipart/form-data with files {CONFIG} and {WEIGHTS} "
                            f"(optionally {TOKENIZER}) and a form field id", "file")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_limit:
        raise APIError(413, f"the upload has {length} bytes, more than the limit of {body_limit} bytes", "file",
                       "adapter_too_large")
    boundary = parse_options_header(ctype)[1].get(b"boundary")
    if not boundary:
        raise APIError(400, "the multipart upload has no boundary", "file")
    sink = _Sink(staged, weights_limit, side_limit)
    parser = MultipartParser(boundary, sink.callbacks())
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > body_limit:
                raise APIError(413, f"the upload is larger than the limit of {body_limit} bytes", "file",
                               "adapter_too_large")
            try:
                parser.write(chunk)
            except APIError:
                raise
            except Exception as exc:  # python-multipart's parse errors
                raise APIError(400, f"invalid multipart data ({exc})", "file") from exc
            if sink.pending_bytes >= FLUSH_BYTES:
                await asyncio.to_thread(sink.flush)
        try:
            parser.finalize()
        except Exception as exc:  # noqa: BLE001 (a truncated body)
            raise APIError(400, f"invalid multipart data ({exc})", "file") from exc
        await asyncio.to_thread(sink.flush)
    except ClientDisconnect as exc:
        raise APIError(499, "the client closed the connection during the upload") from exc
    finally:
        sink.close()
    return sink.fields.get("id"), set(sink.sizes)
