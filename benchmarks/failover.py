"""Failover drill: one spoken conversation through a distributed cascade (several ASR and
TTS replicas, two orchestrators sharing Redis) while one TTS replica, one ASR replica and
then the orchestrator itself are killed; reports what the client saw.

The client is the official ``openai`` SDK (``client.realtime.connect``), speaking piper
speech in 20 ms appends at real time. The drill finds the replica holding the current
stream from the orchestrator's own ``/readyz`` (each replica's open streams) and kills
it with ``--kill`` (a command template: ``docker kill {name}``, ``kill -9 {name}``...),
``{name}`` being the ``--target`` name given for that replica URL (default: the URL's
host, e.g. a container name). ``deploy/images/multi-run.sh`` runs it against containers::

    python -m benchmarks.failover --orchestrator http://127.0.0.1:18000 \\
        --orchestrator http://127.0.0.1:18001 --api-key KEY --kill "docker kill {name}" \\
        --target http://10.0.9.3:8001=cascade-asr-1 --out out/multi-run

Writes report.json and report.md to ``--out``; exits 1 when a turn was not answered or an
item was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from benchmarks.speech import piper_speech
from stages.common.text import wer

RATE = 24_000
FRAME = RATE // 50
TURN_S = 120.0
SHORT = {"instructions": "You are a voice assistant. Answer in one short sentence.",
         "max_output_tokens": 40}
MEDIUM = {"instructions": "You are a storyteller. Tell a story of at least five sentences.",
          "max_output_tokens": 90}
QUESTIONS = ["What is the capital of France?", "Please turn on the lights in the kitchen.",
             "How is the weather today?", "I would like to book a table for four people."]
STORY = "Tell me a story about a dragon."
LONG_QUESTION = "What time does the train to Boston leave tomorrow morning?"


@dataclass
class Conversation:
    """One SDK connection; a reader task stamps every event on arrival."""

    conn: Any
    orchestrator: str
    events: asyncio.Queue[tuple[float, Any]] = field(default_factory=asyncio.Queue)
    items: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    closed: str | None = None

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.conn:
                if event.type in ("conversation.item.added", "conversation.item.done"):
                    if event.item.id not in self.items:
                        self.items.append(event.item.id)
                self.events.put_nowait((time.monotonic(), event))
        except Exception as exc:  # the connection died (its orchestrator was killed)
            self.closed = f"{type(exc).__name__}: {exc}"

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    async def until(self, *kinds: str, limit_s: float = TURN_S) -> list[tuple[float, Any]]:
        seen: list[tuple[float, Any]] = []
        async with asyncio.timeout(limit_s):
            while True:
                stamped = await self.events.get()
                seen.append(stamped)
                if stamped[1].type in kinds:
                    return seen

    async def speak(self, text: str) -> float:
        """``text`` at real time, then 1.5 s of silence; returns when the speech ended."""
        pcm = piper_speech(text, RATE)
        audio = np.concatenate([np.zeros(RATE // 5, np.int16), pcm])
        t0 = time.monotonic()
        for i in range(0, audio.size, FRAME):
            frame = audio[i:i + FRAME]
            await self.conn.input_audio_buffer.append(
                audio=base64.b64encode(frame.tobytes()).decode())
            await asyncio.sleep(max(0.0, t0 + (i + FRAME) / RATE - time.monotonic()))
        ended = time.monotonic()
        silence = base64.b64encode(np.zeros(FRAME, np.int16).tobytes()).decode()
        for _ in range(75):
            await self.conn.input_audio_buffer.append(audio=silence)
            await asyncio.sleep(0.02)
        return ended

    async def configure(self, session: dict[str, Any]) -> None:
        await self.conn.session.update(session={"type": "realtime", **session})
        await self.until("session.updated", limit_s=10)


def summary(events: list[tuple[float, Any]], spoke_until: float) -> dict[str, Any]:
    """A turn's outcome: transcript, reply status, first audio after the speech ended."""
    transcript = next((e.transcript for _, e in events if e.type ==
                       "conversation.item.input_audio_transcription.completed"), None)
    audio = [t for t, e in events if e.type == "response.output_audio.delta"]
    done = next((e for _, e in events if e.type == "response.done"), None)
    status = done.response.status if done is not None else None
    details = done.response.status_details if done is not None else None
    reason = getattr(details, "reason", None)
    return {"transcript": transcript,
            "status": status,
            "answered": status == "completed" or (status == "incomplete"
                                                   and reason == "max_output_tokens"),
            "errors": [e.error.code for _, e in events if e.type == "error"],
            "first_audio_s": round(audio[0] - spoke_until, 3) if audio else None,
            "audio_deltas": len(audio)}


async def turn(conv: Conversation, text: str) -> dict[str, Any]:
    conv.drain()
    speaking = asyncio.create_task(conv.speak(text))
    events = await conv.until("response.done")
    ended = await speaking
    return {"orchestrator": conv.orchestrator, "said": text, **summary(events, ended)}


async def readyz(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        body: dict[str, Any] = (await http.get(f"{base}/readyz")).json()
        return body


async def busy_replica(base: str, stage: str, limit_s: float = 10.0) -> str:
    """The replica URL holding this orchestrator's stream of ``stage`` now."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for replica in (await readyz(base)).get("stages", {}).get(stage, []):
            if replica["streams"] > 0:
                return str(replica["url"])
        await asyncio.sleep(0.02)
    raise RuntimeError(f"no {stage} replica holds a stream of {base}")


def streams_sent(metrics: str) -> dict[str, dict[str, float]]:
    """``cascade_replica_streams_total`` by stage and replica from a /metrics text."""
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r"^cascade_replica_streams_total\{([^}]*)\} (\S+)$", metrics,
                         re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        out.setdefault(labels["stage"], {})[labels["replica"]] = float(m[2])
    return out


class Drill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.orchestrators: list[str] = args.orchestrator
        self.api_key: str = args.api_key
        self.kill_template: str = args.kill
        self.targets: dict[str, str] = dict(t.split("=", 1) for t in args.target)
        self.report: dict[str, Any] = {"turns": []}

    def kill(self, url: str) -> str:
        name = self.targets.get(url) or urlsplit(url).hostname or url
        command = [part.replace("{name}", name) for part in shlex.split(self.kill_template)]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        return name

    def connect(self, base: str, **query: str) -> Any:
        from openai import AsyncOpenAI

        ws = "ws" + base.removeprefix("http") + "/v1"
        client = AsyncOpenAI(api_key=self.api_key, websocket_base_url=ws, base_url=base + "/v1")
        return client.realtime.connect(model="cascade", extra_query=query, max_retries=0)

    async def metrics(self, base: str) -> str:
        async with httpx.AsyncClient(timeout=5.0) as http:
            return (await http.get(f"{base}/metrics")).text

    async def run(self) -> dict[str, Any]:
        first, second = self.orchestrators
        for text in [*QUESTIONS, STORY, LONG_QUESTION]:
            piper_speech(text, RATE)  # synthesized before any clock runs
        # A second conversation on the other orchestrator: both take turns.
        async with self.connect(second) as conn:
            other = Conversation(conn, second)
            other.start()
            await other.until("session.created")
            await other.configure(SHORT)
            self.report["turns"].append(await turn(other, QUESTIONS[3]))
        async with self.connect(first) as conn:
            conv = Conversation(conn, first)
            conv.start()
            created = (await conv.until("session.created"))[-1][1].session
            session_id = created.id
            token = (created.model_extra or {})["cascade"]["resume_token"]
            await conv.configure(SHORT)
            for text in QUESTIONS[:2]:
                self.report["turns"].append(await turn(conv, text))
            self.report["tts_fault"] = await self.tts_fault(conv)
            self.report["asr_fault"] = await self.asr_fault(conv)
            self.report["turns"].append(await turn(conv, QUESTIONS[2]))
            before = await self.metrics(first)
            self.report["readyz_before_orchestrator_kill"] = (await readyz(first))["stages"]
            items = list(conv.items)
            killed_at = time.monotonic()
            self.kill(first)
            kill_s = time.monotonic() - killed_at
            await asyncio.wait_for(asyncio.shield(conv.reader), 30)  # type: ignore[arg-type]
            closed_s = time.monotonic() - killed_at
            self.report["connection_lost"] = conv.closed
        fault = await self.orchestrator_fault(second, session_id, token, items, killed_at)
        # Where the time to resume goes: the kill itself, noticing the dead connection,
        # then reconnecting and loading the session on the other orchestrator.
        fault.update(kill_command_s=round(kill_s, 3), connection_closed_after_s=round(closed_s, 3))
        self.report["orchestrator_fault"] = fault
        sent = streams_sent(before)
        for stage, replicas in streams_sent(await self.metrics(second)).items():
            for url, n in replicas.items():
                sent.setdefault(stage, {})[url] = sent.get(stage, {}).get(url, 0.0) + n
        self.report["streams_per_replica"] = sent
        return self.report

    async def tts_fault(self, conv: Conversation) -> dict[str, Any]:
        await conv.configure(MEDIUM)
        conv.drain()
        speaking = asyncio.create_task(conv.speak(STORY))
        events = await conv.until("response.output_audio.delta")
        url = await busy_replica(conv.orchestrator, "tts")
        name = self.kill(url)
        killed = time.monotonic()
        events += await conv.until("response.done")
        ended = await speaking
        after = [t for t, e in events if e.type == "response.output_audio.delta" and t > killed]
        gaps = [b - a for a, b in zip([killed, *after], after, strict=False)]
        await conv.configure(SHORT)
        return {"killed": name, "replica": url, **summary(events, ended),
                "audio_deltas_after_kill": len(after),
                "longest_audio_gap_s": round(max(gaps, default=0.0), 3)}

    async def asr_fault(self, conv: Conversation) -> dict[str, Any]:
        conv.drain()
        speaking = asyncio.create_task(conv.speak(LONG_QUESTION))
        await conv.until("input_audio_buffer.speech_started", limit_s=30)
        await asyncio.sleep(1.5)  # mid-utterance
        url = await busy_replica(conv.orchestrator, "asr")
        name = self.kill(url)
        events = await conv.until("response.done")
        ended = await speaking
        result = summary(events, ended)
        heard = result["transcript"] or ""
        return {"killed": name, "replica": url, **result,
                "transcript_wer": round(wer(LONG_QUESTION, heard), 3)}

    async def orchestrator_fault(self, base: str, session_id: str, token: str,
                                 items: list[str], killed_at: float) -> dict[str, Any]:
        async with self.connect(base, session_id=session_id, resume_token=token) as conn:
            conv = Conversation(conn, base)
            conv.start()
            await conv.until("session.created")
            resumed_s = time.monotonic() - killed_at
            lost = []
            for item_id in items:
                await conn.conversation.item.retrieve(item_id=item_id)
                got = (await conv.until("conversation.item.retrieved", "error",
                                        limit_s=10))[-1][1]
                if got.type == "error":
                    lost.append(item_id)
            await conv.configure(SHORT)
            next_turn = await turn(conv, QUESTIONS[0])
        return {"resumed_after_s": round(resumed_s, 3), "items": len(items),
                "items_lost": len(lost), "next_turn": next_turn}


def markdown(report: dict[str, Any]) -> str:
    tts, asr, orch = report["tts_fault"], report["asr_fault"], report["orchestrator_fault"]
    lines = [
        "| fault | result |", "| --- | --- |",
        f"| TTS replica `{tts['killed']}` killed as the reply's audio started | reply "
        f"{tts['status']}, {tts['audio_deltas_after_kill']} audio deltas after the kill, "
        f"longest gap {tts['longest_audio_gap_s']} s, errors {tts['errors'] or 'none'} |",
        f"| ASR replica `{asr['killed']}` killed mid-utterance | transcript "
        f"{asr['transcript']!r} (WER {asr['transcript_wer']}), reply {asr['status']} |",
        f"| orchestrator killed | connection seen closed after "
        f"{orch['connection_closed_after_s']} s (kill command {orch['kill_command_s']} s); "
        f"resumed on the other after {orch['resumed_after_s']} s, "
        f"items {orch['items'] - orch['items_lost']}/{orch['items']} "
        f"(lost {orch['items_lost']}), next turn {orch['next_turn']['status']} |",
        "", "| turn | orchestrator | status | first audio after speech (s) |",
        "| --- | --- | --- | --- |"]
    lines += [f"| {t['said']} | {t['orchestrator']} | {t['status']} | {t['first_audio_s']} |"
              for t in report["turns"]]
    lines += ["", "| stage | replica | streams sent |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {url} | {n:g} |"
              for stage, replicas in sorted(report["streams_per_replica"].items())
              for url, n in sorted(replicas.items())]
    return "\n".join(lines) + "\n"


def passed(report: dict[str, Any]) -> bool:
    turns = [*report["turns"], report["tts_fault"], report["asr_fault"],
             report["orchestrator_fault"]["next_turn"]]
    return all(t["answered"] for t in turns) and report["orchestrator_fault"]["items_lost"] == 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--orchestrator", action="append", required=True,
                        help="base URL of an orchestrator (give two)")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--kill", required=True, help='command template, e.g. "docker kill '
                        '{name}"')
    parser.add_argument("--target", action="append", default=[], metavar="URL=NAME",
                        help="the name --kill gets for a replica (or orchestrator) URL")
    parser.add_argument("--out", default="out/failover")
    args = parser.parse_args(argv)
    if len(args.orchestrator) != 2:
        parser.error("give exactly two --orchestrator URLs")
    report = asyncio.run(Drill(args).run())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    ok = passed(report)
    print("failover drill:", "PASSED" if ok else "FAILED", f"({out / 'report.json'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
