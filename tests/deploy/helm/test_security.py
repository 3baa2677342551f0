"""Security properties of every render: non-root cascade containers, credentials only
through Secrets, GPUs only where the values ask for them."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from tests.deploy.helm.chart import (
    COMPONENT_LABEL,
    Obj,
    containers,
    labels,
    render,
    values_names,
)

VALUES = values_names()
# Always from a Secret (secretKeyRef), never a literal value.
SECRET_ENV = {"CASCADE_API_KEY", "CASCADE_REDIS_URL", "CASCADE_LLM_API_KEY",
              "CASCADE_ICE_SERVERS", "HF_TOKEN", "REDIS_PASSWORD", "CASCADE_STAGE_API_KEY",
              "VLLM_API_KEY"}
SECRET_NAME = re.compile(r"(KEY|PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL)", re.IGNORECASE)
URL_WITH_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)
# Values with known secrets, to find them anywhere outside Secrets.
PLANTED = {
    "auth.apiKey": "sk-planted-api-key-0123456789",
    "redis.bundled.auth.password": "planted-redis-password-42",
    "llm.external.apiKey": "sk-planted-llm-key-9876543210",
    "stageAuth.key": "planted-stage-key-1357924680",
}


def is_cascade_image(image: str) -> bool:
    return "/cascade-" in image or image.startswith("cascade-")


def effective_security(pod: Obj, container: Obj) -> dict[str, Any]:
    merged = dict(pod["spec"].get("securityContext") or {})
    merged.update(container.get("securityContext") or {})
    return merged


@pytest.mark.parametrize("values", VALUES)
def test_cascade_containers_run_as_non_root(values: str) -> None:
    r = render(values)
    seen = 0
    for workload, pod in r.pods():
        for container in containers(pod):
            if not is_cascade_image(container["image"]):
                continue
            seen += 1
            where = f"{workload['metadata']['name']}/{container['name']}"
            ctx = effective_security(pod, container)
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot {ctx}"
            assert ctx.get("runAsUser", 10001) != 0, where
            own = container.get("securityContext") or {}
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("readOnlyRootFilesystem") is True, where
            assert "ALL" in ((own.get("capabilities") or {}).get("drop") or []), where
            assert not own.get("privileged"), where
    assert seen, "no cascade container in the render"


@pytest.mark.parametrize("values", VALUES)
def test_no_pod_mounts_an_api_token_or_shares_host_namespaces(values: str) -> None:
    r = render(values)
    for workload, pod in r.pods():
        spec = pod["spec"]
        where = workload["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostPID") and not spec.get("hostIPC"), where
        if spec.get("hostNetwork"):
            assert labels(pod).get(COMPONENT_LABEL) == "orchestrator", where
            assert r.values["webrtc"]["mode"] == "hostNetwork", where


REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def secret_refs_only(value: str, from_secrets: set[str]) -> tuple[str, bool]:
    """``value`` with its $(VAR) references to Secret-backed variables taken out, and
    whether it had any. Kubernetes expands $(VAR) from variables defined before it."""
    used = False

    def drop(match: re.Match[str]) -> str:
        nonlocal used
        if match.group(1) in from_secrets:
            used = True
            return ""
        return match.group(0)

    return REFERENCE.sub(drop, value), used


def test_secret_reference_rule_itself() -> None:
    assert secret_refs_only("redis://:$(PW)@redis:6379/0", {"PW"}) == ("redis://:@redis:6379/0",
                                                                         True)
    assert secret_refs_only("redis://:$(PW)@redis", set())[1] is False
    assert URL_WITH_CREDENTIALS.search("redis://:hunter2@redis:6379/0")
    assert URL_WITH_CREDENTIALS.search("https://user:pw@llm.example.com/v1")
    assert not URL_WITH_CREDENTIALS.search("redis://:@redis:6379/0")
    assert not URL_WITH_CREDENTIALS.search("http://cascade-asr.voice.svc:8001")


@pytest.mark.parametrize("values", VALUES)
def test_credentials_come_from_secrets(values: str) -> None:
    """CASCADE_API_KEY, CASCADE_REDIS_URL, ... come from secretKeyRef (a literal may only
    compose Secret-backed variables defined before it, as in redis://:$(REDIS_PASSWORD)@);
    no literal value, argument or command holds a credential."""
    r = render(values)
    for workload, pod in r.pods():
        for container in containers(pod):
            where = f"{workload['metadata']['name']}/{container['name']}"
            from_secrets: set[str] = set()
            for env in container.get("env") or []:
                name = env["name"]
                if "secretKeyRef" in (env.get("valueFrom") or {}):
                    from_secrets.add(name)
                    continue
                if "value" not in env:
                    continue
                value, composed = secret_refs_only(str(env["value"]), from_secrets)
                if name in SECRET_ENV:
                    assert composed, f"{where}: {name}={env['value']!r} is a literal, not a " \
                        "secretKeyRef"
                assert not SECRET_NAME.search(name) or not value or composed, (
                    f"{where}: {name}={value!r} looks like a credential given as a literal")
                assert not URL_WITH_CREDENTIALS.search(value), f"{where}: {name} has credentials"
                assert not value.startswith(("sk-", "hf_")), f"{where}: {name} holds a key"
            for arg in [*(container.get("command") or []), *(container.get("args") or [])]:
                plain, _ = secret_refs_only(str(arg), from_secrets)
                assert not URL_WITH_CREDENTIALS.search(plain), f"{where}: argument {arg!r}"
    orchestrator = r.component("orchestrator")
    assert orchestrator is not None
    names = {e["name"] for c in containers(orchestrator["spec"]["template"])
             for e in c.get("env") or []}
    assert "CASCADE_API_KEY" in names, "the orchestrator must require an API key"
    assert "CASCADE_REDIS_URL" in names, "orchestrators share sessions through Redis"


def test_planted_secrets_appear_only_in_secrets() -> None:
    """Known credentials in the values end up in Secret objects and nowhere else (not in a
    ConfigMap, an env value, an argument or an annotation)."""
    set_args: list[str] = []
    for key, value in PLANTED.items():
        set_args += ["--set", f"{key}={value}"]
    r = render("default", set_args=(
        *set_args, "--set", "stageAuth.enabled=true", "--set", "llm.mode=external", "--set",
        "llm.external.url=https://llm.example.com/v1", "--set", "llm.external.model=assistant"))
    secrets_text = ""
    for obj in r.objects:
        if obj["kind"] == "Secret":
            secrets_text += yaml.safe_dump(obj.get("stringData") or {})
            for encoded in (obj.get("data") or {}).values():
                secrets_text += base64.b64decode(encoded).decode(errors="replace") + "\n"
            continue
        text = yaml.safe_dump(obj)
        for key, value in PLANTED.items():
            assert value not in text, f"{key} appears in {obj['kind']}/{obj['metadata']['name']}"
    for key, value in PLANTED.items():
        assert value in secrets_text, f"{key} is in no Secret"


def gpu_resources(container: Obj) -> dict[str, Any]:
    resources = container.get("resources") or {}
    out: dict[str, Any] = {}
    for section in ("requests", "limits"):
        for name, amount in (resources.get(section) or {}).items():
            if name.startswith("nvidia.com/") or "gpu" in name:
                out[f"{section}.{name}"] = amount
    return out


def expected_gpus(values: dict[str, Any], component: str) -> tuple[str, int] | None:
    if component in ("asr", "tts"):
        v = values[component]
        if v["enabled"] and v["gpu"]["enabled"]:
            return v["gpu"]["resourceName"], int(v["gpu"]["count"])
    if component == "llm" and values["llm"]["mode"] == "vllm":
        llm = values["llm"]
        return llm["gpu"]["resourceName"], int(llm["vllm"]["tensorParallelSize"])
    return None


@pytest.mark.parametrize("values", VALUES)
def test_gpus_only_where_the_values_ask(values: str) -> None:
    r = render(values)
    for workload, pod in r.pods():
        component = labels(pod).get(COMPONENT_LABEL, "")
        want = expected_gpus(r.values, component)
        for container in containers(pod):
            got = gpu_resources(container)
            where = f"{workload['metadata']['name']}/{container['name']}"
            is_main = container in containers(pod, init=False)[:1]
            if want is None or not is_main:
                assert not got, f"{where} requests GPUs {got}; the values ask for none"
                continue
            resource, count = want
            assert got == {f"requests.{resource}": count, f"limits.{resource}": count}, (
                f"{where}: GPU resources {got}, expected {count} x {resource} (requests = "
                "limits, as extended resources need)")
        if component in ("asr", "tts") and is_cascade_image(containers(pod)[0]["image"]):
            main = containers(pod, init=False)[0]
            device = {e["name"]: e.get("value") for e in main.get("env") or []}.get(
                f"CASCADE_{component.upper()}_DEVICE", "cpu")
            image = main["image"].split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
            v = r.values[component]
            if want is None:
                assert device == "cpu" and image == v["image"]["repository"], (component, device,
                                                                               image)
            else:
                assert device == "cuda" and image == v["image"]["gpuRepository"], (
                    component, device, image)
