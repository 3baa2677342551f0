"""Run the chart's rendered containers as local processes, as the kubelet would start them.

    python deploy/helm/run_local.py RENDER.yaml --namespace NS --report OUT.json

Each workload's main container (rendered.py resolves it) runs as a process of this
machine with the container's own environment and argv — the image's CMD when the chart
gives none, from its Dockerfile — with only these changes, each one logged in the report:

- a Service DNS name in an env value or argument becomes 127.0.0.1 (the processes share
  this host; run inside a fresh network namespace so the rendered ports are free);
- an emptyDir mount path becomes a folder of the run (HOME and TMPDIR are folders too);
- the image's own ENV entries that point inside the image (/opt, /app) are left out, so
  the venv's defaults apply; PATH is the venv's. An env value *of the chart* pointing
  inside the image is reported (``image_paths``): the chart should not set one.

Redis and the stages start first, one by one, each waited for through its rendered
readiness probe (HTTP GET, or the exec command run with the container's environment);
then the orchestrator. Each runs as PID 1 of a PID namespace of its own (unshare), as in
its container, so SIGTERM is handled as there. Then one real Realtime exchange through the
orchestrator (realtime_check.py: session.created, a text turn answered with audio, a wrong
key refused), then SIGTERM to each (orchestrator first): it must exit 0 within
terminationGracePeriodSeconds minus its preStop sleep. Every process is killed by PID when
the run ends. Writes a JSON report; exits 0 when everything held.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import realtime_check
import rendered
from rendered import Spec

IMAGE_PATHS = ("/opt/", "/app/")
CREDENTIALS = re.compile(r"//[^/@\s]*@")  # user:password@ of a URL, never logged
ORDER = {"redis": 0, "asr": 1, "tts": 1, "llm": 1, "orchestrator": 2}


@dataclass
class Running:
    spec: Spec
    env: dict[str, str]
    argv: list[str]
    log: Path
    changes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    # The server's own PID (PID 1 of its PID namespace when started under unshare).
    server_pid: int | None = None
    ready_s: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def image_internal(value: str) -> bool:
    return value.startswith(IMAGE_PATHS) or value in ("/opt", "/app")


def prepare(spec: Spec, names: list[str], work: Path, venv_bin: Path,
            image_paths: list[str]) -> Running:
    root = work / spec.component
    home, tmp = root / "home", root / "tmp"
    for folder in (home, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    changes: list[str] = []
    mounts: dict[str, Path] = {}
    for mount in spec.mounts:
        if mount.kind != "emptyDir":
            raise rendered.RenderProblem(f"{spec.component}: volume {mount.name} "
                                         f"({mount.kind}) cannot be run locally")
        local = tmp if mount.path == "/tmp" else root / f"mount-{mount.name}"
        local.mkdir(parents=True, exist_ok=True)
        mounts[mount.path] = local

    def localize(what: str, value: str) -> str:
        new = rendered.rewrite_hosts(value, names)
        for path, local in sorted(mounts.items(), key=lambda m: len(m[0]), reverse=True):
            if new == path or new.startswith(path + "/"):
                new = str(local) + new[len(path):]
                break  # the longest mount that holds it, once
        if new != value:
            shown = rendered.redact(f"{value} -> {new}", spec)
            changes.append(f"{what}: {CREDENTIALS.sub('//***@', shown)}")
        return new

    env = {"PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8"}
    for key, value in spec.image_info.env.items():
        if key == "PATH":
            continue
        if image_internal(value):
            changes.append(f"image ENV {key}={value} left out (inside the image)")
            continue
        env[key] = value
    for key, value in spec.env.items():
        if image_internal(value):
            image_paths.append(f"{spec.component}: {key}={value}")
        env[key] = localize(key, value)
    argv = [localize("argument", a) for a in spec.argv]
    if not argv:
        raise rendered.RenderProblem(f"{spec.component}: no command (no CMD known for "
                                     f"{spec.image})")
    found = shutil.which(argv[0], path=env["PATH"])
    if found is None:
        raise rendered.RenderProblem(f"{spec.component}: {argv[0]} is not installed here")
    argv[0] = found
    return Running(spec, env, argv, root / "log.txt", changes)


def probe_once(run: Running, probe: rendered.Probe) -> bool:
    try:
        if probe.kind == "http":
            url = f"http://127.0.0.1:{probe.port}{probe.path}"
            with urllib.request.urlopen(url, timeout=probe.timeout_s) as answer:
                return bool(200 <= answer.status < 400)
        if probe.kind == "tcp":
            import socket

            with socket.create_connection(("127.0.0.1", probe.port or 0), probe.timeout_s):
                return True
        out = subprocess.run(probe.command, env=run.env, capture_output=True,
                             timeout=max(probe.timeout_s, 5.0), check=False)
        return out.returncode == 0
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
        return False


def child_of(pid: int, limit_s: float = 10.0) -> int | None:
    """The (first) child process of ``pid``, once it exists."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                return int(entry.name)
        time.sleep(0.05)
    return None


def start(run: Running, hang_guard_s: float, pid1: bool) -> None:
    """Start the container's process. With ``pid1`` it runs as PID 1 of a PID namespace of
    its own, as in a container: a signal it has no handler for is ignored there (uvicorn
    re-raises SIGTERM after its graceful shutdown; as PID 1 the server then exits 0)."""
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--", *run.argv] if pid1 else run.argv
    with open(run.log, "wb") as log:
        run.proc = subprocess.Popen(argv, env=run.env, cwd=run.env["HOME"], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    run.server_pid = child_of(run.proc.pid) if pid1 else run.proc.pid
    if run.server_pid is None:
        raise RuntimeError(f"{run.spec.component}: no process under unshare")
    began = time.monotonic()
    probe = run.spec.readiness
    if probe is None:
        raise rendered.RenderProblem(f"{run.spec.component} has no readiness probe")
    budget = probe.budget_s() + (run.spec.startup.budget_s() if run.spec.startup else 0)
    limit = min(budget, hang_guard_s)
    while time.monotonic() - began < limit:
        if run.proc.poll() is not None:
            raise RuntimeError(f"{run.spec.component} exited ({run.proc.returncode}) before "
                               f"it was ready:\n{run.tail()}")
        if probe_once(run, probe):
            run.ready_s = round(time.monotonic() - began, 2)
            return
        time.sleep(0.25)
    raise RuntimeError(f"{run.spec.component}: readiness ({probe.describe()}) not passed "
                       f"within {limit:.0f} s:\n{run.tail()}")


def stop(run: Running) -> None:
    proc = run.proc
    assert proc is not None and run.server_pid is not None
    allowed = run.spec.grace_s - run.spec.prestop_s
    began = time.monotonic()
    os.kill(run.server_pid, signal.SIGTERM)  # what the kubelet's runtime does after preStop
    try:
        code: int | None = proc.wait(timeout=allowed)
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
        proc.wait()
    run.result.update({"exit_code": code, "stop_s": round(time.monotonic() - began, 2),
                       "stop_allowed_s": allowed})


def readyz(port: int) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError) as err:
        return {"error": str(err)}


def run_all(render: Path, namespace: str, report: dict[str, Any], work: Path,
            hang_guard_s: float, pid1: bool) -> bool:
    objects = rendered.load(render.read_text())
    specs = sorted(rendered.specs(objects, namespace),
                   key=lambda s: ORDER.get(s.component, 1))
    names = [alias for spec in specs for alias in spec.aliases]
    venv_bin = Path(sys.executable).parent
    image_paths: list[str] = []
    runs = [prepare(spec, names, work, venv_bin, image_paths) for spec in specs]
    report["image_paths"] = image_paths
    report["pid1"] = pid1
    report["components"] = {}
    for run in runs:
        report["components"][run.spec.component] = run.result
        run.result.update({
            "argv": rendered.redact(" ".join(run.argv), run.spec),
            "changes": run.changes, "readiness": run.spec.readiness.describe()
            if run.spec.readiness else None, "grace_s": run.spec.grace_s,
            "prestop_s": run.spec.prestop_s})
    started: list[Running] = []
    try:
        for run in runs:
            started.append(run)
            start(run, hang_guard_s, pid1)
            run.result["ready_s"] = run.ready_s
        orchestrator = next(r for r in runs if r.spec.component == "orchestrator")
        port = orchestrator.spec.readiness.port if orchestrator.spec.readiness else 8000
        report["orchestrator_readyz"] = readyz(port or 8000)
        key = orchestrator.env.get("CASCADE_API_KEY", "")
        try:
            exchange = realtime_check.exchange(f"ws://127.0.0.1:{port}", key)
            exchange["ok"] = realtime_check.ok(exchange)
        except Exception as err:  # reported, the run goes on to the stops
            exchange = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        report["exchange"] = exchange
        for run in sorted(started, key=lambda r: -ORDER.get(r.spec.component, 1)):
            stop(run)
    except Exception as err:  # reported with the logs
        report["error"] = f"{type(err).__name__}: {err}"
    finally:
        for run in started:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            run.result["log_tail"] = run.tail(15)
    passed = ("error" not in report and report.get("exchange", {}).get("ok") is True
              and all(r.result.get("exit_code") == 0 for r in runs))
    report["passed"] = passed
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("render", type=Path)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--hang-guard-s", type=float, default=240.0,
                        help="longest wait for one readiness (the probes may allow more)")
    parser.add_argument("--no-pid1", action="store_true",
                        help="do not run each server as PID 1 of its own PID namespace")
    args = parser.parse_args(argv)
    pid1 = not args.no_pid1 and os.geteuid() == 0 and shutil.which("unshare") is not None
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cascade-rendered-") as work:
        try:
            ok = run_all(args.render, args.namespace, report, Path(work), args.hang_guard_s,
                         pid1)
        except rendered.RenderProblem as problem:
            report["error"] = f"the render cannot run: {problem}"
            ok = False
    args.report.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
