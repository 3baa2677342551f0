"""Validation, JSON encoding and resume tokens, shared by both backends.

Both backends keep every value as compact JSON text: the size bound is checked on the
exact bytes stored, and readers always get a fresh copy (a caller mutating a dict it
passed in or got back never changes the stored state), with the same semantics whether
the store is in memory or in Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel

from orchestrator.store.errors import InvalidItem, SessionNotFound, StoreLimitError

# Item id of the conversation's start: ``append_item(previous_item_id=ROOT)`` inserts first
# (the Realtime API's ``previous_item_id: "root"``).
ROOT = "root"
# Session ids end up inside Redis keys (and their ``{...}`` hash tag): a strict alphabet.
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Client secret ids (a SHA-256 hex digest in practice) end up inside Redis keys too.
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_ITEM_ID_CHARS = 128
MAX_TOKEN_CHARS = 256
MAX_OWNER_CHARS = 256

JsonObject = Mapping[str, Any] | BaseModel


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(12)


def new_resume_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Only this SHA-256 hex digest of a resume token is ever stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: object, stored_hash: str) -> bool:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        return False
    return hmac.compare_digest(hash_token(token), stored_hash)


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        raise SessionNotFound(f"malformed session id {str(session_id)[:80]!r}")
    return session_id


def valid_secret_id(key_id: object) -> bool:
    return isinstance(key_id, str) and _SECRET_ID.match(key_id) is not None


def check_secret_id(key_id: object) -> str:
    """A client secret's id; a programming error if malformed (callers store a digest)."""
    if not valid_secret_id(key_id):
        raise ValueError(f"client secret id must match {_SECRET_ID.pattern}")
    assert isinstance(key_id, str)
    return key_id


def check_ttl(ttl_s: object) -> float:
    """A positive, finite lifetime in seconds."""
    if (isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float)
            or not math.isfinite(ttl_s) or ttl_s <= 0):
        raise ValueError(f"ttl_s must be a positive finite number of seconds, got {ttl_s!r}")
    return float(ttl_s)


def check_owner(owner: object) -> str:
    """A lease owner id (a connection's id); a programming error if malformed."""
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS:
        raise ValueError(f"lease owner must be a non-empty string of at most "
                         f"{MAX_OWNER_CHARS} characters")
    return owner


def as_dict(value: JsonObject, what: str) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    raise InvalidItem(f"{what} must be a JSON object, got {type(value).__name__}")


def encode(value: Mapping[str, Any], what: str, max_bytes: int) -> str:
    """Compact JSON of ``value``; ``InvalidItem`` if not JSON-able, ``StoreLimitError``
    if its UTF-8 size exceeds ``max_bytes``."""
    return _encode_sized(value, what, max_bytes)[0]


def _encode_sized(value: Mapping[str, Any], what: str, max_bytes: int) -> tuple[str, int]:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidItem(f"{what} is not JSON-serializable: {exc}") from exc
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise StoreLimitError(f"{what} is {size} bytes, over the limit of {max_bytes}")
    return text, size


def decode(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):  # only ever written by encode(); guards corruption
        raise InvalidItem("stored value is not a JSON object")
    return value


def check_item_id(item_id: object) -> str:
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidItem(f"item id must be a non-empty string of at most "
                          f"{MAX_ITEM_ID_CHARS} characters, got {str(item_id)[:80]!r}")
    if item_id == ROOT:
        raise InvalidItem(f"item id {ROOT!r} is reserved for the start of the conversation")
    return item_id


class EncodedItem(NamedTuple):
    id: str
    text: str
    size: int  # UTF-8 bytes of text, what counts against the session's byte bound


def encode_item(item: JsonObject, max_bytes: int, item_id: str | None = None) -> EncodedItem:
    """A conversation item ready to store. With ``item_id`` (an update) the body's ``id``
    must match it or be absent (then it is filled in)."""
    body = as_dict(item, "item")
    if item_id is not None:
        check_item_id(item_id)
        if body.setdefault("id", item_id) != item_id:
            raise InvalidItem(f"item body id {body['id']!r} differs from {item_id!r}")
    checked = check_item_id(body.get("id"))
    return EncodedItem(checked, *_encode_sized(body, "item", max_bytes))
