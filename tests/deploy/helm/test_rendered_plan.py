"""deploy/helm/rendered.py: what the kubelet would run, worked out from a render.

The local run (test_rendered_processes.py) and the Docker run (run-rendered.sh) start
containers from these specs, so each resolution step is checked here against the render
itself: Secrets, $(VAR) expansion, fieldRefs, argv from the Dockerfiles, Service names,
Docker options and env files.
"""

from __future__ import annotations

import base64
import importlib.util
import shlex
import stat
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.helm.chart import NAMESPACE, ROOT, render

MODULE = ROOT / "deploy" / "helm" / "rendered.py"


def load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cascade_helm_rendered", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rendered = load_module()


def secret(objects: list[dict[str, Any]], name: str, key: str) -> str:
    obj = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name)
    return base64.b64decode(obj["data"][key]).decode()


def by_component(values: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    objects = render(values).objects
    return objects, {s.component: s for s in rendered.specs(objects, NAMESPACE)}


def test_cpu_only_specs() -> None:
    objects, specs = by_component("cpu-only")
    assert set(specs) == {"orchestrator", "asr", "tts", "llm", "redis"}
    # No command/args in the chart: the image's CMD, from its Dockerfile.
    assert specs["orchestrator"].argv == ["cascade", "serve"]
    assert specs["asr"].argv == ["cascade", "stage", "asr"]
    assert specs["tts"].argv == ["cascade", "stage", "tts"]
    assert specs["llm"].argv == ["cascade", "stage", "llm"]
    assert specs["llm"].image_info.dockerfile == ROOT / "deploy/images/llm-cpu/Dockerfile"
    # Secrets resolved; $(REDIS_PASSWORD) expanded in Redis' arguments.
    password = secret(objects, "cascade-redis", "redis-password")
    redis = specs["redis"]
    assert redis.argv[0] == "redis-server"
    assert redis.argv[redis.argv.index("--requirepass") + 1] == password
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= redis.secret_env
    orch = specs["orchestrator"]
    assert orch.env["CASCADE_API_KEY"] == secret(objects, "cascade-orchestrator", "api-key")
    assert password in orch.env["CASCADE_REDIS_URL"]
    assert {"CASCADE_API_KEY", "CASCADE_REDIS_URL"} <= orch.secret_env
    # The orchestrator's stage URLs name hosts the stages answer to.
    for stage, var in (("asr", "CASCADE_ASR_URL"), ("tts", "CASCADE_TTS_URL"),
                       ("llm", "CASCADE_LLM_URL"), ("redis", "CASCADE_REDIS_URL")):
        host = orch.env[var].split("@")[-1].split("//")[-1].split(":")[0]
        assert host in specs[stage].aliases, (var, host, specs[stage].aliases)
    assert orch.readiness.kind == "http" and orch.readiness.path == "/readyz"
    assert orch.readiness.port == 8000
    assert redis.readiness.kind == "exec"
    assert orch.grace_s > orch.prestop_s + float(orch.env["CASCADE_DRAIN_TIMEOUT_S"])


def test_docker_options_reproduce_the_security_context() -> None:
    _, specs = by_component("cpu-only")
    opts = rendered.docker_options(specs["asr"])
    assert opts[opts.index("--user") + 1] == "10001:10001"
    assert "--read-only" in opts
    assert opts[opts.index("--cap-drop") + 1] == "ALL"
    assert opts[opts.index("--security-opt") + 1] == "no-new-privileges"
    tmpfs = [opts[i + 1] for i, o in enumerate(opts) if o == "--tmpfs"]
    assert sorted(t.split(":")[0] for t in tmpfs) == ["/home/cascade", "/tmp"]
    assert int(opts[opts.index("--memory") + 1]) == 1024**3  # limits.memory 1Gi


def test_docker_plan_lines_and_env_files(tmp_path: Path) -> None:
    objects = render("cpu-only").objects
    lines = rendered.docker_plan(objects, NAMESPACE, tmp_path, "local", "cascade-redis:local")
    plans = [dict(w.split("=", 1) for w in shlex.split(line)) for line in lines]
    order = [p["component"] for p in plans]
    assert order[0] == "redis" and order[-1] == "orchestrator", order
    images = {p["component"]: p["image"] for p in plans}
    assert images["asr"] == "cascade-asr:local" and images["redis"] == "cascade-redis:local"
    for plan in plans:
        env_file = Path(plan["env_file"])
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert plan["probe_kind"] in ("http", "exec")
    orch_env = dict(line.split("=", 1) for line in
                    (tmp_path / "orchestrator.env").read_text().splitlines())
    assert orch_env["CASCADE_API_KEY"] == secret(objects, "cascade-orchestrator", "api-key")
    redis_plan = next(p for p in plans if p["component"] == "redis")
    assert shlex.split(redis_plan["argv"])[0] == "redis-server"
    assert "cascade-redis" in redis_plan["aliases"].split()


def test_field_refs_and_expansion() -> None:
    _, specs = by_component("webrtc-hostnetwork")
    env = specs["orchestrator"].env
    assert env["NODE_IP"] == "127.0.0.1"
    assert env["CASCADE_ICE_HOST_ADDRESSES"] == '["127.0.0.1"]'
    assert rendered.expand("$(A)-$$(A)-$(B)", {"A": "1"}) == "1-$(A)-$(B)"


def test_existing_secret_outside_the_render_is_reported() -> None:
    objects = render("existing-secrets").objects
    with pytest.raises(rendered.RenderProblem, match=r"is not in the render"):
        rendered.specs(objects, NAMESPACE)


def test_rewrite_hosts() -> None:
    names = ["cascade-asr", "cascade-asr.voice.svc", "cascade-redis.voice.svc"]
    assert rendered.rewrite_hosts("http://cascade-asr.voice.svc:8001,http://cascade-asr:8001",
                                  names) == "http://127.0.0.1:8001,http://127.0.0.1:8001"
    assert rendered.rewrite_hosts("redis://:p@cascade-redis.voice.svc:6379/0", names) == \
        "redis://:p@127.0.0.1:6379/0"
    assert rendered.rewrite_hosts("http://cascade-asr-extra:8001", names) == \
        "http://cascade-asr-extra:8001"
    assert rendered.rewrite_hosts("cascade-asr", names) == "127.0.0.1"


def test_runtime_argv_rules() -> None:
    image = rendered.Image(entrypoint=["/entry"], cmd=["serve", "--x"])
    assert rendered.runtime_argv(None, None, image) == ["/entry", "serve", "--x"]
    assert rendered.runtime_argv(None, ["run"], image) == ["/entry", "run"]
    assert rendered.runtime_argv(["/bin/sh"], ["-c", "x"], image) == ["/bin/sh", "-c", "x"]


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "deploy" / "images").glob("*/Dockerfile")),
                         ids=lambda p: p.parent.name)
def test_every_image_cmd_is_read(dockerfile: Path) -> None:
    image = rendered.parse_dockerfile(dockerfile)
    assert image.cmd[:1] == ["cascade"], image.cmd
    assert image.user.startswith("10001")
