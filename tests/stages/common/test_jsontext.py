"""strict_loads: JSON a server can echo, store and forward, or a ValueError."""

from __future__ import annotations

import pytest

from stages.common.jsontext import strict_loads


def test_plain_json_and_pairs() -> None:
    assert strict_loads('{"a": ["\\ud83d\\ude00", 1]}') == {"a": ["\U0001f600", 1]}
    assert strict_loads(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}  # an escaped backslash


@pytest.mark.parametrize("data", [
    "[" * 100_000, "[" * 5000 + "]" * 5000, '"\\ud800"', '{"\\udc00": 1}', '["a\\udbffb"]',
    "\"\ud800\"", b"\xff\xfe{", "{",
])
def test_refused(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        strict_loads(data)
