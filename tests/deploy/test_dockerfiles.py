"""The images' Dockerfiles: hadolint, and the properties every image must keep.

Building the images takes minutes and a Docker daemon, so CI does not build them
(`bash deploy/images/build-local.sh && bash deploy/images/smoke.sh` does, before a release
and on every change to deploy/). These tests read the Dockerfiles instead: each one lints
clean, takes its base image as a build argument, runs as a non-root user, has a
HEALTHCHECK on /readyz, starts its server in exec form (so SIGTERM reaches it), listens on
all interfaces through the settings' own environment variables, and keeps the builder's
CA bundle and tools out of the final stage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from orchestrator.settings import ServeSettings
from stages.asr.settings import AsrSettings
from stages.llm.settings import LlmSettings
from stages.tts.settings import TtsSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
EXPECTED = {"orchestrator", "asr", "asr-cuda", "tts", "tts-gpu", "llm-cpu", "all-in-one"}
GPU = {"asr-cuda", "tts-gpu"}
# What each image's server is: the settings class whose env prefix configures it.
SETTINGS: dict[str, type[BaseSettings]] = {
    "orchestrator": ServeSettings, "all-in-one": ServeSettings, "asr": AsrSettings,
    "asr-cuda": AsrSettings, "tts": TtsSettings, "tts-gpu": TtsSettings, "llm-cpu": LlmSettings}
# The only things the final stage takes from the builder.
FINAL_COPIES = ["/opt/cuda", "/opt/venv", "/opt/models", "/app"]


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[list[Instruction], list[Stage]]:
    """Instructions before the first FROM, and the stages (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    head: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        ins = Instruction(keyword.upper(), " ".join(args.split()))
        if ins.keyword == "FROM":
            base, _, name = ins.args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            head.append(ins)
    return head, stages


def dockerfiles() -> list[Path]:
    return sorted(IMAGES.glob("*/Dockerfile"))


def test_one_dockerfile_per_image() -> None:
    assert {p.parent.name for p in dockerfiles()} == EXPECTED


def hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_hadolint_clean(path: Path) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install 'cascade[dev]')")
    done = subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_base_image_is_a_build_argument(path: Path) -> None:
    head, stages = parse(path)
    assert [(i.keyword, i.args.split("=")[0]) for i in head] == [("ARG", "BASE_IMAGE")]
    default = head[0].args.split("=", 1)[1]
    # The public image users pull, pinned to a patch release.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", default), default
    assert all(stage.base == "${BASE_IMAGE}" for stage in stages)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_final_stage_runs_as_a_user_with_health_and_exec_form(path: Path) -> None:
    final = parse(path)[1][-1]
    users = final.all("USER")
    assert len(users) == 1 and users[0].split(":")[0] not in {"0", "root"}
    assert users[0].split(":")[0].isdigit()  # numeric: Kubernetes can check runAsNonRoot
    (health,) = final.all("HEALTHCHECK")
    options, _, command = health.partition("CMD ")
    assert "--interval=" in options and "--start-period=" in options
    probe = json.loads(command)
    assert isinstance(probe, list) and "/readyz" in " ".join(probe)
    (cmd,) = final.all("CMD")
    argv = json.loads(cmd)
    assert isinstance(argv, list) and argv[0] == "cascade", argv
    assert final.all("ENTRYPOINT") == []
    # The user is switched after every root step.
    keywords = [i.keyword for i in final.instructions]
    assert "RUN" not in keywords[keywords.index("USER"):]


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_server_listens_on_all_interfaces_on_its_port(path: Path) -> None:
    image = path.parent.name
    final = parse(path)[1][-1]
    prefix = str(SETTINGS[image].model_config.get("env_prefix"))
    env = dict(pair.split("=", 1) for e in final.all("ENV") for pair in e.split())
    assert env[f"{prefix}HOST"] == "0.0.0.0"
    port = env[f"{prefix}PORT"]
    assert final.all("EXPOSE") == [port]
    assert f"'{prefix}PORT', '{port}'" in final.all("HEALTHCHECK")[0]
    argv = json.loads(final.all("CMD")[0])
    stage = image.split("-")[0]
    if SETTINGS[image] is ServeSettings:
        assert argv == ["cascade", "serve"]
    else:
        assert argv == ["cascade", "stage", stage]
        assert SETTINGS[image]().model_dump()["port"] == int(port)  # the stage's default
    if image in GPU:
        assert env[f"{prefix}DEVICE"] == "cuda"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_final_stage_takes_only_the_built_tree(path: Path) -> None:
    """No CA bundle, wheel cache or build tool reaches the final stage: it copies nothing
    from the build context, and from the builder only these trees, models before code."""
    final = parse(path)[1][-1]
    copies = final.all("COPY") + final.all("ADD")
    sources = []
    for copy in copies:
        words = copy.split()
        assert words[0] == "--from=builder", copy
        assert words[1] == words[2], copy  # same path in both stages
        sources.append(words[1])
    expected = [s for s in FINAL_COPIES if s != "/opt/cuda" or path.parent.name in GPU]
    assert sources == expected
    assert not any(a.startswith(("PIP_", "UV_")) for a in final.all("ARG"))


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.parent.name)
def test_dependencies_install_before_the_code_arrives(path: Path) -> None:
    builder = next(s for s in parse(path)[1] if s.name == "builder")
    order = [i.args for i in builder.instructions if i.keyword in {"COPY", "RUN"}]
    first_code = next(n for n, a in enumerate(order) if a.startswith("orchestrator "))
    deps = next(n for n, a in enumerate(order) if "builder.sh deps " in a)
    models = next(n for n, a in enumerate(order) if "builder.sh models " in a)
    assert deps < models < first_code


def test_build_inputs_stay_out_of_git() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "deploy/images/extra/certs/ca-certificates.crt",
         "deploy/images/extra/wheels/x.whl"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == ["deploy/images/extra/certs/ca-certificates.crt",
                                      "deploy/images/extra/wheels/x.whl"]
    kept = subprocess.run(["git", "check-ignore", "-q", "deploy/images/extra/README.md"],
                          cwd=ROOT)
    assert kept.returncode == 1  # not ignored


def test_build_context_leaves_out_the_environment() -> None:
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"  # everything out, then only what the images copy back in
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "orchestrator", "stages", "benchmarks",
                       "deploy/images/builder.sh", "deploy/images/requirements.py",
                       "deploy/images/smart_turn.py", "deploy/images/extra"}


def test_tool_pins_match_install_sh() -> None:
    builder = (IMAGES / "builder.sh").read_text()
    install = (ROOT / "deploy" / "install.sh").read_text()
    uv = re.search(r"^UV_VERSION=(\S+)$", builder, re.M)
    assert uv is not None and f"uv=={uv.group(1)}" in install
    assert re.search(r"^PIP_VERSION=\d+\.\d+(\.\d+)?$", builder, re.M)


@pytest.mark.parametrize("script", ["build-local.sh", "smoke.sh", "builder.sh", "dockerd.sh",
                                    "multi-run.sh"])
def test_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(IMAGES / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
