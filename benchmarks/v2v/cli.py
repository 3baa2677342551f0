"""``cascade bench``: run the benchmark and write its report (options: options.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.v2v import conversation_stats, stats
from benchmarks.v2v import report as report_mod
from benchmarks.v2v.client import LEAD_S, PreparedClip, TurnOptions
from benchmarks.v2v.corpus import INTERRUPT, Clip, builtin_clip, builtin_corpus, wav_clip
from benchmarks.v2v.machine import machine_info
from benchmarks.v2v.modes import Eagerness, ModeSpec, parse_mode
from benchmarks.v2v.options import (
    BUILTIN_CLIPS,
    DEFAULT_CONVERSATION_GAPS,
    DEFAULT_CONVERSATION_TURNS,
    QUICK_CONVERSATION_GAPS,
    QUICK_CONVERSATION_TURNS,
    USAGE,
    add_arguments,
)
from benchmarks.v2v.records import (
    TRANSPORTS,
    BenchConfig,
    MachineInfo,
    Report,
    Transport,
    TurnRecord,
)
from benchmarks.v2v.runner import Schedule, levels_up_to, run


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _clips(args: argparse.Namespace) -> list[Clip]:
    if args.wav:
        clips = []
        for path in args.wav:
            txt = path.with_suffix(".txt")
            clips.append(wav_clip(path, txt.read_text().strip() if txt.exists() else None))
        return clips
    return builtin_corpus(_csv(args.clips or BUILTIN_CLIPS))


def _transports(args: argparse.Namespace) -> tuple[Transport, ...]:
    names = list(dict.fromkeys(_csv(args.transports)))
    known: dict[str, Transport] = {t: t for t in TRANSPORTS}
    if not names or any(n not in known for n in names):
        raise SystemExit(f"cascade bench: --transports takes a comma list of "
                         f"{', '.join(TRANSPORTS)} (got {args.transports!r})")
    if "webrtc" in names and args.dialect == "beta":
        raise SystemExit("cascade bench: WebRTC calls speak the GA dialect; drop "
                         "--dialect beta or --transports webrtc")
    return tuple(known[n] for n in names)


def calls_url(ws_url: str) -> str:
    """The WebRTC calls endpoint next to a Realtime WebSocket URL: same host, path
    ``.../v1/realtime`` + ``/calls``, same query (e.g. ``?model=``)."""
    import httpx

    url = httpx.URL(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return str(url.copy_with(scheme=scheme, path=url.path.rstrip("/") + "/calls"))


def mode_specs(modes: Sequence[str], eagerness: Eagerness) -> list[ModeSpec]:
    """Each mode resolved (modes.py); a malformed name ends the command with its reason."""
    try:
        return [parse_mode(m, eagerness) for m in modes]
    except ValueError as exc:
        raise SystemExit(f"cascade bench: --modes: {exc}") from None


def _schedule(args: argparse.Namespace) -> Schedule:
    modes = tuple(dict.fromkeys(_csv(args.modes)))
    if not modes:
        raise SystemExit("cascade bench: --modes is empty")
    mode_specs(modes, args.eagerness)  # a malformed name stops here, before any turn
    transports = _transports(args)
    if args.concurrency:
        try:
            levels = tuple(sorted({int(x) for x in _csv(args.concurrency)}))
        except ValueError:
            raise SystemExit("cascade bench: --concurrency takes integers, e.g. 1,2,4") from None
        if any(n < 1 for n in levels):
            raise SystemExit("cascade bench: concurrency levels must be >= 1")
    else:
        levels = levels_up_to(args.max_concurrency)
    sweep_modes = tuple(_csv(args.sweep_modes)) if args.sweep_modes else modes[:1]
    mode_specs(sweep_modes, args.eagerness)
    if args.rounds < 1 or args.sweep_turns < 1:
        raise SystemExit("cascade bench: --rounds and --sweep-turns must be >= 1")
    if args.warmup < 0 or args.barge_in_rounds < 0:
        raise SystemExit("cascade bench: --warmup and --barge-in-rounds must be >= 0")
    turns, gaps, rounds = _conversation(args)
    return Schedule(modes=modes, rounds=args.rounds, concurrency=levels, warmup=args.warmup,
                    barge_in_rounds=args.barge_in_rounds,
                    sweep_modes=sweep_modes if levels else (), sweep_turns=args.sweep_turns,
                    conversation_rounds=rounds, conversation_turns=turns,
                    conversation_gaps=gaps, transports=transports)


def _conversation(args: argparse.Namespace) -> tuple[int, tuple[float, ...], int]:
    """(turns per connection, gaps, connections per mode); (0, (), 0) when skipped."""
    quick = args.quick
    turns = args.conversation_turns
    if turns is None:
        turns = QUICK_CONVERSATION_TURNS if quick else DEFAULT_CONVERSATION_TURNS
    text = args.conversation_gaps
    if text is None:
        text = QUICK_CONVERSATION_GAPS if quick else DEFAULT_CONVERSATION_GAPS
    try:
        gaps = tuple(float(x) for x in _csv(text))
    except ValueError:
        raise SystemExit("cascade bench: --conversation-gaps takes seconds, e.g. 1,3,65"
                         ) from None
    if turns < 0 or args.conversation_rounds < 0 or any(g < 0 for g in gaps):
        raise SystemExit("cascade bench: --conversation-turns, --conversation-rounds and "
                         "--conversation-gaps must be >= 0")
    if turns > 1 and not gaps:
        raise SystemExit("cascade bench: --conversation-gaps is empty")
    if args.no_conversation or turns == 0 or args.conversation_rounds == 0:
        return 0, (), 0
    return turns, gaps, args.conversation_rounds


@contextlib.contextmanager
def _target(url: str | None, api_key: str, serve_args: list[str]) -> Iterator[str]:
    if url:
        # http(s):// is what people copy from a deployment; the API is the same host.
        for http, ws in (("http://", "ws://"), ("https://", "wss://")):
            if url.startswith(http):
                url = ws + url.removeprefix(http)
        yield url
        return
    from orchestrator.launcher import serve_process

    with serve_process("--api-key", api_key, *serve_args) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime"


def _progress_label(rec: TurnRecord) -> str:
    over = "" if rec.transport == "ws" else f" ({rec.transport})"
    where = f"{rec.phase} {rec.mode}{over} x{rec.concurrency} {rec.clip}"
    if rec.phase == "conversation":
        gap = "" if rec.gap_before_s is None else f" after {rec.gap_before_s:.0f} s"
        where = f"conversation {rec.mode} turn {rec.turn_index}{gap} {rec.clip}"
        if not rec.replied:
            return f"{where}: NO REPLY: {(rec.error or 'no spoken reply')[:80]}"
        return f"{where}: v2v {rec.first_audio_ms:.0f} ms, gaps {rec.gap_total_ms:.0f} ms"
    if rec.error:
        return f"{where}: error {rec.error[:60]}"
    if rec.phase == "barge_in":
        ended = ("reply sent in full, truncated by the client" if rec.client_truncate
                 else f"cancelled {rec.barge_in_cancel_ms:.0f} ms"
                 if rec.barge_in_cancel_ms is not None else "not cancelled")
        return f"{where}: barge-in noticed {rec.barge_in_ms:.0f} ms, {ended}"
    return f"{where}: v2v {rec.first_audio_ms:.0f} ms, gaps {rec.gap_total_ms:.0f} ms"


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:  # a log file or CI: do not squeeze tables into 80 columns
        console = Console(width=120)
    if args.quick:
        args.clips, args.rounds, args.sweep_turns = args.clips or "question", 1, 1
        args.concurrency = args.concurrency or "1,2"
    schedule = _schedule(args)
    if "webrtc" in schedule.transports:
        # aioice logs every ICE check at INFO: a dozen lines per call between the turns.
        for name in ("aioice", "aiortc"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        clips = _clips(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cascade bench: {exc}") from None
    prepared = [PreparedClip(c) for c in clips]
    interrupt = PreparedClip(builtin_clip(INTERRUPT)) if schedule.barge_in_rounds else None
    api_key = args.api_key or os.environ.get("CASCADE_BENCH_API_KEY") or (
        "" if args.url else f"bench-{secrets.token_hex(8)}")
    out = args.out or Path("out/bench") / datetime.datetime.now(datetime.UTC).strftime(
        "%Y%m%d-%H%M%S")
    started = time.perf_counter()
    machine = machine_info()  # before the run: the commit that is measured
    with _target(args.url, api_key, args.serve_arg) as url:
        headers = {"Authorization": f"Bearer {api_key}"}
        if args.dialect == "beta":
            headers["OpenAI-Beta"] = "realtime=v1"
        rtc = (args.calls_url or calls_url(url)) if "webrtc" in schedule.transports else None
        opts = TurnOptions(url=url, headers=headers, dialect=args.dialect, calls_url=rtc,
                           instructions=args.instructions,
                           max_output_tokens=args.max_output_tokens or None,
                           transcription_model=args.transcription_model or None,
                           gap_threshold_s=args.gap_threshold_ms / 1000,
                           reply_timeout_s=args.reply_timeout, eagerness=args.eagerness)
        talk = (f"{schedule.conversation_turns} turns, gaps "
                f"{','.join(f'{g:g}' for g in schedule.conversation_gaps) or '-'} s"
                if schedule.conversation_turns else "off")
        over = f" + WebRTC {rtc}" if rtc else ""
        console.print(f"cascade bench: {url}{over} · modes {', '.join(schedule.modes)} · "
                      f"{len(clips)} clip(s) x {schedule.rounds} round(s) · conversation "
                      f"{talk} · sweep {list(schedule.concurrency) or 'off'}")
        total = schedule.total_turns(len(clips))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("warm-up turn" if schedule.warmup else "starting", total=total)
            done = 0

            def advance(rec: TurnRecord) -> None:
                nonlocal done
                done += 1
                bar.update(task, advance=1, description=_progress_label(rec))
                if not console.is_terminal:  # a log: one line per turn instead of a bar
                    console.print(f"[{done}/{total}] {_progress_label(rec)}")

            records = asyncio.run(run(opts, prepared, schedule, advance, interrupt))
    report = build_report(records, clips, schedule, args, target=url,
                          wall_s=time.perf_counter() - started, machine=machine,
                          calls_url=rtc)
    files = report_mod.write_report(report, out)
    report_mod.print_summary(report, console)
    for mode in report.realtime_limit:
        console.print(report_mod.limit_sentence(report, mode))
    console.print(f"report: {out}/ ({', '.join(sorted(p.name for p in files.values()))})")
    code = 0
    for phase in ("compare", "conversation"):
        failed = [r for r in records if r.phase == phase and not r.replied]
        if failed:
            console.print(f"[red]{len(failed)} {phase}-phase turn(s) got no spoken reply: "
                          f"{escape(failed[0].error or 'no audio')}[/red]")
            code = 2
    return code


def build_report(records: list[TurnRecord], clips: list[Clip], schedule: Schedule,
                 args: argparse.Namespace, target: str, wall_s: float,
                 machine: MachineInfo | None = None, calls_url: str | None = None) -> Report:
    config = BenchConfig(target=target, embedded=not args.url, modes=list(schedule.modes),
                         mode_specs=mode_specs(
                             list(dict.fromkeys(schedule.modes + schedule.sweep_modes)),
                             args.eagerness),
                         transports=list(schedule.transports), calls_url=calls_url,
                         rounds=schedule.rounds, clips=[c.info for c in clips],
                         concurrency=list(schedule.concurrency),
                         sweep_rounds=schedule.sweep_turns, warmup=schedule.warmup,
                         barge_in_rounds=schedule.barge_in_rounds,
                         conversation_rounds=schedule.conversation_rounds,
                         conversation_turns=schedule.conversation_turns,
                         conversation_gaps_s=list(schedule.conversation_gaps),
                         max_output_tokens=args.max_output_tokens or None,
                         instructions=args.instructions, dialect=args.dialect,
                         gap_threshold_ms=args.gap_threshold_ms, lead_ms=LEAD_S * 1000)
    compare = stats.group(records, "compare")
    sweep = stats.group(records, "sweep")
    return Report(machine=machine or machine_info(), config=config, records=records,
                  compare=compare, ratio=stats.ratios(compare), sweep=sweep,
                  barge_in=stats.group(records, "barge_in"),
                  conversation=conversation_stats.summarize(records),
                  realtime_limit=stats.realtime_limit(sweep), wall_s=round(wall_s, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade bench", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))
