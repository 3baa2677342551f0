"""One real Realtime exchange with an orchestrator, as its clients would have it.

    python realtime_check.py ws://HOST:PORT        # key from $CHECK_API_KEY

Opens a WebSocket session with the API key (Authorization: Bearer), waits for
``session.created``, sends a user text turn and ``response.create``, and waits for
``response.done``: the reply crosses the LLM and the TTS the orchestrator is wired to.
Also checks that a wrong key is refused. Prints one JSON object; exit 0 when the reply
completed with audio. Standard library and ``websockets`` only (both are in the
orchestrator image: run-rendered.sh pipes this file to ``docker exec ... python -``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

TURN = "Say hello to the cluster in a few words."


def refused(url: str) -> bool:
    try:
        with connect(url, additional_headers={"Authorization": "Bearer sk-wrong"},
                     open_timeout=10) as ws:
            ws.recv(timeout=10)
    except InvalidStatus as err:
        return err.response.status_code in (401, 403)
    except Exception:  # closed by the server after accepting: also refused
        return True
    return False


def exchange(base: str, key: str, limit_s: float = 90.0) -> dict[str, Any]:
    url = f"{base.rstrip('/')}/v1/realtime?model=cascade"
    result: dict[str, Any] = {"url": url, "wrong_key_refused": refused(url)}
    start = time.monotonic()
    counts: dict[str, int] = {}
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                 open_timeout=20, max_size=None) as ws:
        first = json.loads(ws.recv(timeout=20))
        result["first_event"] = first.get("type")
        result["session_id"] = (first.get("session") or {}).get("id")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": TURN}]}}))
        ws.send(json.dumps({"type": "response.create"}))
        transcript = ""
        while True:
            left = limit_s - (time.monotonic() - start)
            if left <= 0:
                result["error"] = f"no response.done within {limit_s:.0f} s"
                break
            event = json.loads(ws.recv(timeout=left))
            kind = event.get("type", "")
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "response.output_audio_transcript.delta":
                transcript += event.get("delta", "")
            if kind == "error":
                result.setdefault("errors", []).append(event.get("error"))
            if kind == "response.done":
                response = event["response"]
                result["status"] = response.get("status")
                result["status_details"] = response.get("status_details")
                break
    result["seconds"] = round(time.monotonic() - start, 2)
    result["transcript"] = transcript
    result["audio_deltas"] = counts.get("response.output_audio.delta", 0)
    result["events"] = counts
    return result


def ok(result: dict[str, Any]) -> bool:
    details = result.get("status_details") or {}
    answered = result.get("status") == "completed" or (
        result.get("status") == "incomplete" and details.get("reason") == "max_output_tokens")
    return bool(result.get("first_event") == "session.created" and answered
                and result.get("audio_deltas") and not result.get("errors")
                and result.get("wrong_key_refused"))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    result = exchange(argv[0], os.environ["CHECK_API_KEY"])
    result["ok"] = ok(result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
