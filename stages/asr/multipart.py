"""Minimal multipart/form-data parser for the transcription endpoint.

FastAPI's ``Form``/``File`` need the python-multipart package, which this project does not
install; an upload here is one bounded body (``max_message_bytes``) already in memory, so
splitting it on the boundary is all that is needed.
"""

from __future__ import annotations

from dataclasses import dataclass


class MultipartError(ValueError):
    pass


@dataclass(frozen=True)
class FormPart:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def _params(header_value: str) -> tuple[str, dict[str, str]]:
    main, *rest = header_value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.strip().partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), params


def parse_form(body: bytes, content_type: str) -> dict[str, list[FormPart]]:
    kind, params = _params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError("expected a multipart/form-data body")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("multipart body without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 2:
        raise MultipartError("multipart boundary not found in body")
    form: dict[str, list[FormPart]] = {}
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("malformed multipart part (no header end)")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        _, disp = _params(headers.get("content-disposition", ""))
        name = disp.get("name")
        if name is None:
            raise MultipartError("multipart part without a name")
        part = FormPart(name=name, data=data, filename=disp.get("filename"),
                        content_type=headers.get("content-type"))
        form.setdefault(name, []).append(part)
    return form
