"""The chart's wiring, not only its YAML: the rendered containers, started with the chart's
own environment and arguments, become ready and serve a real Realtime turn.

ci/cpu-only-values.yaml is rendered; deploy/helm/run_local.py starts Redis, the ASR, TTS
and llama.cpp LLM stages and the orchestrator as local processes (argv from the render or
the image's CMD, env with the rendered Secrets resolved), in a private network namespace so
the rendered ports are theirs; the only changes are Service names -> 127.0.0.1, emptyDir
paths -> local folders and the image's own /opt paths left out, and each is checked here.
Each must pass its rendered readiness probe; a session with the rendered API key gets
``session.created`` and a spoken reply (the orchestrator really reaches the LLM and TTS it
was given, under the model name the chart set), a wrong key is refused, and SIGTERM ends
every process with exit 0 inside terminationGracePeriodSeconds.

Needs the embedded extras (CI has them), redis-server, and root with unshare/ip for the
namespace; skips with the reason otherwise (helm itself: see chart.require_helm).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helm.chart import (
    API_VERSIONS,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    require_helm,
    run_helm,
    values_path,
)

RUNNER = ROOT / "deploy" / "helm" / "run_local.py"
VALUES = "cpu-only"
COMPONENTS = {"orchestrator", "asr", "tts", "llm", "redis"}
RUN_LIMIT_S = 480


def allowed_change(change: str) -> bool:
    """run_local.py's changes: "image ENV K=V left out (inside the image)", or
    "WHAT: OLD -> NEW" with a Service name made 127.0.0.1 or a mount made a local folder."""
    if change.startswith("image ENV ") and change.endswith("left out (inside the image)"):
        return True
    _, _, values = change.partition(": ")
    old, sep, new = values.partition(" -> ")
    if not sep:
        return False
    host = "127.0.0.1" in new and "127.0.0.1" not in old
    mount = "cascade-rendered-" in new and "cascade-rendered-" not in old
    return host or mount


def test_allowed_changes_rule() -> None:
    assert allowed_change("CASCADE_ASR_URL: http://cascade-asr.voice.svc:8001 -> "
                          "http://127.0.0.1:8001")
    assert allowed_change("argument: /data -> /tmp/cascade-rendered-x/redis/mount-data")
    assert allowed_change("image ENV CASCADE_SMART_TURN_MODEL=/opt/m.onnx left out (inside "
                          "the image)")
    assert not allowed_change("CASCADE_ASR_PORT: 8001 -> 9001")
    assert not allowed_change("something else")


def missing_requirements() -> list[str]:
    missing = [f"the embedded extras ({m})" for m in ("faster_whisper", "piper", "llama_cpp")
               if importlib.util.find_spec(m) is None]
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing.append("redis-server and redis-cli (apt-get install redis-server)")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        missing.append("root with unshare and ip (a private network namespace)")
    return missing


@pytest.mark.slow
@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_rendered_cpu_only_release_runs(tmp_path: Path) -> None:
    helm = require_helm()
    missing = missing_requirements()
    if missing:
        reason = "needs " + ", ".join(missing)
        if os.environ.get("CASCADE_REQUIRE_HELM"):  # CI: the chart's wiring must be run
            pytest.fail(f"{reason} (CASCADE_REQUIRE_HELM is set)")
        pytest.skip(reason)
    path = values_path(VALUES)
    assert path is not None and path.exists(), path
    args = ["template", RELEASE, str(path.parents[1]), "-n", NAMESPACE, "--kube-version",
            KUBE_VERSION, "-f", str(path)]
    for api in API_VERSIONS:
        args += ["--api-versions", api]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stderr
    render = tmp_path / "render.yaml"
    render.write_text(out.stdout)
    report_path = tmp_path / "report.json"
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
           "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
           sys.executable, str(RUNNER), str(render), "--namespace", NAMESPACE,
           "--report", str(report_path)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_LIMIT_S,
                             check=False)
    except subprocess.TimeoutExpired as err:  # unshare --kill-child ends everything inside
        pytest.fail(f"the rendered release ran past {RUN_LIMIT_S} s: {err.stderr!r}")
    assert report_path.exists(), f"no report (exit {run.returncode}):\n{run.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    logs = json.dumps({c: r.get("log_tail") for c, r in report.get("components", {}).items()},
                      indent=1)
    assert "error" not in report, f"{report['error']}\n{logs}"
    components = report["components"]
    assert set(components) == COMPONENTS
    assert report["pid1"], "each server must run as PID 1, as in its container"
    print(f"\n{'component':<13} {'ready_s':>7}  {'readiness':<28} {'stop':<22} changes")
    for name, result in components.items():
        print(f"{name:<13} {result['ready_s']:>7}  {result['readiness']:<28} "
              f"exit {result['exit_code']} in {result['stop_s']:.2f}/{result['stop_allowed_s']} s"
              f"  {len(result['changes'])}")
        for change in result["changes"]:
            print(f"    {change}")
    exchange = report["exchange"]
    print(f"exchange: {exchange.get('status')} in {exchange.get('seconds')} s, "
          f"{exchange.get('audio_deltas')} audio deltas: {exchange.get('transcript')!r}")

    # The only changes to what the chart renders.
    for name, result in components.items():
        for change in result["changes"]:
            assert allowed_change(change), f"{name}: unexpected change {change}"
    assert not report["image_paths"], (
        f"the chart points at paths inside the images: {report['image_paths']}")
    # The orchestrator was given the Service names of the stages: each was rewritten.
    rewritten = " ".join(components["orchestrator"]["changes"])
    for var in ("CASCADE_ASR_URL", "CASCADE_TTS_URL", "CASCADE_LLM_URL", "CASCADE_REDIS_URL"):
        assert var in rewritten, f"{var} did not name a Service of the release"

    readyz = report["orchestrator_readyz"]
    assert readyz.get("status") == "ready", readyz
    for stage in ("asr", "tts", "llm"):
        replicas = (readyz.get("stages") or {}).get(stage) or []
        assert replicas and all(r.get("up") for r in replicas), (stage, readyz)

    assert exchange["ok"], json.dumps(exchange, indent=1) + logs
    assert exchange["first_event"] == "session.created"
    assert exchange["wrong_key_refused"], "a wrong API key was let in"
    for name, result in components.items():
        assert result["exit_code"] == 0, f"{name} exit {result['exit_code']}\n{logs}"
        assert result["stop_s"] <= result["stop_allowed_s"], (name, result)
