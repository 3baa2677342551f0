"""Autoscalers, replicas and graceful shutdown in every render.

An HPA or a KEDA ScaledObject exists for exactly the components whose values enable
autoscaling (KEDA when autoscaling.keda.enabled), with their bounds and metrics; a scaled
Deployment leaves ``replicas`` to its autoscaler; and no pod can be SIGKILLed in the
middle of its drain: terminationGracePeriodSeconds covers the preStop sleep plus the
container's own drain timeout (read from its rendered environment).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.helm import chart
from tests.deploy.helm.chart import (
    COMPONENT_LABEL,
    Obj,
    Render,
    containers,
    labels,
    render,
    values_names,
)

VALUES = values_names()
SCALABLE = ("orchestrator", "asr", "tts", "llm")
DRAIN_ENV = {"orchestrator": "CASCADE_DRAIN_TIMEOUT_S", "asr": "CASCADE_ASR_DRAIN_TIMEOUT_S",
             "tts": "CASCADE_TTS_DRAIN_TIMEOUT_S", "llm": "CASCADE_LLM_DRAIN_TIMEOUT_S"}


def component_of_target(r: Render, ref: dict[str, Any]) -> str:
    target = r.get(ref.get("kind", "Deployment"), ref["name"])
    assert target is not None, f"autoscaler target {ref} not rendered"
    return labels(target["spec"]["template"]).get(COMPONENT_LABEL, "")


def autoscaled(r: Render) -> dict[str, list[Obj]]:
    out: dict[str, list[Obj]] = {}
    for obj in r.of("HorizontalPodAutoscaler") + r.of("ScaledObject"):
        out.setdefault(component_of_target(r, obj["spec"]["scaleTargetRef"]), []).append(obj)
    return out


def wants_autoscaling(values: dict[str, Any], component: str) -> bool:
    if component in ("asr", "tts") and not values[component]["enabled"]:
        return False
    if component == "llm" and values["llm"]["mode"] == "external":
        return False
    return bool(values[component]["autoscaling"]["enabled"])


@pytest.mark.parametrize("values", VALUES)
def test_autoscalers_for_exactly_the_enabled_components(values: str) -> None:
    r = render(values)
    keda = bool(r.values["autoscaling"]["keda"]["enabled"])
    found = autoscaled(r)
    expected = {c for c in SCALABLE if wants_autoscaling(r.values, c)}
    assert set(found) == expected, f"autoscaled {sorted(found)}, values enable {sorted(expected)}"
    for component, objs in found.items():
        kinds = [o["kind"] for o in objs]
        assert kinds == (["ScaledObject"] if keda else ["HorizontalPodAutoscaler"]), (
            component, kinds)
        scaling = r.values[component]["autoscaling"]
        spec = objs[0]["spec"]
        workload = r.component(component)
        assert workload is not None
        assert "replicas" not in workload["spec"], (
            f"{component}: the Deployment sets replicas while its autoscaler owns them "
            "(every helm upgrade would reset the scale)")
        if keda:
            assert spec["minReplicaCount"] == scaling["minReplicas"]
            assert spec["maxReplicaCount"] == scaling["maxReplicas"]
            check_keda_triggers(component, scaling, spec)
        else:
            assert spec["minReplicas"] == scaling["minReplicas"]
            assert spec["maxReplicas"] == scaling["maxReplicas"]
            check_hpa_metrics(component, scaling, spec)
        assert spec.get("minReplicas", spec.get("minReplicaCount", 1)) <= spec.get(
            "maxReplicas", spec.get("maxReplicaCount"))
    for component in SCALABLE:
        if component in found:
            continue
        workload = r.component(component)
        if workload is not None:
            want = r.values[component]["replicaCount"]
            assert workload["spec"].get("replicas") == want, (component, want)


def check_hpa_metrics(component: str, scaling: dict[str, Any], spec: Obj) -> None:
    metrics = spec["metrics"]
    if scaling["type"] == "cpu":
        assert metrics == [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": scaling["cpuAverageUtilization"]}}}]
        return
    want = [(m.get("hpaName") or m["series"], str(m["averageValue"]))
            for m in scaling["customMetrics"]]
    got = [(m["pods"]["metric"]["name"], str(m["pods"]["target"]["averageValue"]))
           for m in metrics if m["type"] == "Pods"]
    assert got == want, f"{component}: HPA metrics {got}, values {want}"
    for name, _ in got:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name), (
            f"{component}: {name!r} is not a name the metrics API can serve (':' is not "
            "allowed: set hpaName)")
    if "behavior" in scaling:
        assert spec.get("behavior") == scaling["behavior"], component


def check_keda_triggers(component: str, scaling: dict[str, Any], spec: Obj) -> None:
    triggers = spec["triggers"]
    assert triggers, component
    for trigger in triggers:
        metadata = trigger.get("metadata") or {}
        # KEDA's CRD types every metadata value as a string: a number is rejected.
        bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
        assert not bad, f"{component}: trigger metadata not strings: {bad}"
    if scaling["type"] == "cpu":
        assert [t["type"] for t in triggers] == ["cpu"], component
        assert triggers[0].get("metricType") == "Utilization"
        return
    prom = [t for t in triggers if t["type"] == "prometheus"]
    assert len(prom) == len(scaling["customMetrics"]), component
    for trigger, metric in zip(prom, scaling["customMetrics"], strict=True):
        md = trigger["metadata"]
        assert md["serverAddress"].startswith("http"), md
        assert metric["series"] in md["query"], (metric["series"], md["query"])
        assert float(md["threshold"]) == float(metric["averageValue"]), md


def generated_pod_name(deployment: str) -> str:
    """A pod name as Kubernetes makes it for a Deployment: ReplicaSet NAME-HASH (a
    pod-template-hash of up to 10 safe characters), then the pod by generateName, whose base
    is cut to 58 characters before the 5 random ones."""
    base = f"{deployment}-7c9f5b8d6b-"[:58]
    return base + "x7k2p"


@pytest.mark.parametrize("release", [chart.RELEASE, chart.LONG_RELEASE],
                         ids=["release", "long-release"])
@pytest.mark.parametrize("values", VALUES)
def test_keda_queries_select_the_target_pods(values: str, release: str) -> None:
    """A prometheus trigger's query names its pods by a regex: it must match the names
    Kubernetes gives the target's pods (also with Helm's longest release name, where pod
    names are cut), and this namespace, or KEDA scales on nothing."""
    r = render(values, release=release, set_args=("--set", "autoscaling.keda.enabled=true"))
    for so in r.of("ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        pod = generated_pod_name(target)
        for trigger in so["spec"]["triggers"]:
            if trigger["type"] != "prometheus":
                continue
            query = trigger["metadata"]["query"]
            for regex in re.findall(r'pod=~"((?:[^"\\]|\\.)*)"', query):
                assert re.fullmatch(regex.replace("\\\\", "\\"), pod), (
                    f"{so['metadata']['name']}: pod=~{regex!r} does not match {pod!r}, a name "
                    "Kubernetes gives the target's pods")
            namespaces = re.findall(r'namespace="([^"]*)"', query)
            assert namespaces in ([], [chart.NAMESPACE]), (query, namespaces)


def prestop_seconds(container: Obj) -> int:
    hook = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    if command[:1] == ["sleep"]:
        return int(command[1])
    assert not hook, f"unknown preStop hook {hook}"
    return 0


def drain_seconds(r: Render, component: str, container: Obj) -> float:
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    if component in DRAIN_ENV and DRAIN_ENV[component] in env:
        return float(env[DRAIN_ENV[component]])
    if component == "llm" and r.values["llm"]["mode"] == "vllm":
        return float(r.values["llm"]["drainTimeoutSeconds"])
    # Redis, and any container without a drain setting: the image default stage drain.
    return 0.0


@pytest.mark.parametrize("kube", ["1.29.0", "1.33.0"])
@pytest.mark.parametrize("values", VALUES)
def test_grace_period_covers_prestop_and_drain(values: str, kube: str) -> None:
    r = render(values, kube=kube)
    sleep = int(r.values["shutdown"]["preStopSleepSeconds"])
    for workload, pod in r.pods():
        component = labels(pod).get(COMPONENT_LABEL, "")
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        for container in containers(pod, init=False):
            where = f"{workload['metadata']['name']}/{container['name']}"
            pre = prestop_seconds(container)
            if component in SCALABLE:
                assert pre == sleep, f"{where}: preStop {pre} s, values {sleep} s"
                hook = container["lifecycle"]["preStop"] if sleep else {}
                if sleep:
                    assert ("exec" in hook) == (kube == "1.29.0"), (
                        f"{where}: the sleep action needs Kubernetes >= 1.30: {hook}")
            drain = drain_seconds(r, component, container)
            if component in ("orchestrator", "asr", "tts") or (
                    component == "llm" and r.values["llm"]["mode"] == "cpu"):
                assert drain == float(r.values[component]["drainTimeoutSeconds"]), (
                    f"{where}: drain env {drain} vs values")
            assert grace >= pre + drain + 1, (
                f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre} + drain "
                f"{drain}: SIGKILL would cut the drain")
