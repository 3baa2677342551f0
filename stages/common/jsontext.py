"""``strict_loads``: JSON from a client, refused (``ValueError``) unless it is text that
can be echoed, stored and forwarded.

Python's ``json.loads`` accepts two things that later blow up far from the parser:
nesting deep enough to exhaust the interpreter's recursion limit (``RecursionError``, not
a ``ValueError``), and ``\\ud800``-style escapes of lone UTF-16 surrogates, which decode to
a ``str`` that no UTF-8 encoder accepts (the store, the WebSocket, a JSON response and the
stage clients all encode it again). Other parsers refuse both (RFC 8259 section 8.2 calls
such strings unpredictable); so does this one, as invalid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A \u escape of a surrogate (D800-DFFF); pairs are fine, so a hit is only a reason to look.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE = ("the JSON holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its "
         "pair): not valid Unicode text")


def strict_loads(data: str | bytes | bytearray) -> Any:
    """``json.loads`` that also raises ``ValueError`` for too-deep nesting and for strings
    holding lone surrogates."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(_LONE) from None
    else:
        raw = bytes(data)
    try:
        # a str parses as it is: json.loads of bytes would decode them to a str again
        value = json.loads(data if isinstance(data, str) else raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(_LONE) from None
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None
    return value
