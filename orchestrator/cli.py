"""The ``cascade`` command line.

    cascade stage asr|llm|tts [--host H] [--port P] [--device cpu|cuda] [--set key=value ...]
    cascade demo [--out reply.wav] [--question TEXT]
    cascade bench-stages [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

STAGES = ("asr", "llm", "tts")


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def run_stage(name: str, host: str | None, port: int | None, device: str | None,
              extra: dict[str, Any]) -> None:
    settings_mod = importlib.import_module(f"stages.{name}.settings")
    service_mod = importlib.import_module(f"stages.{name}.service")
    from stages.common.service import serve

    overrides = dict(extra)
    for key, value in (("host", host), ("port", port), ("device", device)):
        if value is not None:
            overrides[key] = value
    settings = settings_mod.SETTINGS_CLASS(**overrides)
    app = service_mod.create_app(settings)
    serve(app, settings.host, settings.port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cascade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p_stage = sub.add_parser("stage", help="run one stage (asr, llm, tts) as its own service")
    p_stage.add_argument("name", choices=STAGES)
    p_stage.add_argument("--host")
    p_stage.add_argument("--port", type=int)
    p_stage.add_argument("--device", choices=("cpu", "cuda", "auto"))
    p_stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="any field of the stage's settings (also CASCADE_<STAGE>_<KEY>)")

    p_demo = sub.add_parser("demo", help="spoken round trip through the three stage services")
    p_demo.add_argument("--out", default="reply.wav", help="WAV file for the spoken answer")
    p_demo.add_argument("--question", default="What is the capital of France?")
    p_demo.add_argument("--in-process", action="store_true",
                        help="use the in-process engines instead of starting services")

    p_bench = sub.add_parser("bench-stages", help="per-stage latency benchmark (CPU default)")
    p_bench.add_argument("--out", default="out/bench-stages", help="folder for the JSON report")
    p_bench.add_argument("--repeats", type=int, default=3)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request to a stage would drown the output; errors still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "stage":
        run_stage(args.name, args.host, args.port, args.device, _parse_sets(args.set))
    elif args.command == "demo":
        from orchestrator.demo import run_demo

        sys.exit(run_demo(args.out, args.question, in_process=args.in_process))
    elif args.command == "bench-stages":
        from benchmarks.stages import run_all

        sys.exit(run_all(args.out, repeats=args.repeats))


if __name__ == "__main__":
    main()
