"""The rendered NetworkPolicies, evaluated: exactly the intended paths are open.

Every values file is rendered with networkPolicy.enabled=true; the pods of the render
(their labels and named ports) and a few pods outside it (Prometheus in the monitoring
namespace, another app in the release namespace, the cluster DNS, an address outside the
cluster) are the endpoints, and tests/deploy/helm/netpol.py says what the policies allow.
"""

from __future__ import annotations

import itertools
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.helm.chart import (
    COMPONENT_LABEL,
    NAMESPACE,
    Obj,
    Render,
    containers,
    labels,
    render,
    values_names,
)
from tests.deploy.helm.netpol import Endpoint, allowed, outside, pod

VALUES = values_names()
STAGES = ("asr", "tts", "llm")
INTERNET = "203.0.113.7"  # TEST-NET-3: an address outside the cluster


def rendered(values: str) -> Render:
    return render(values, set_args=("--set", "networkPolicy.enabled=true"))


def endpoints(r: Render) -> dict[str, Endpoint]:
    out: dict[str, Endpoint] = {}
    for _, template in r.pods():
        component = labels(template).get(COMPONENT_LABEL, "")
        ports = {p["name"]: int(p["containerPort"]) for c in containers(template, init=False)
                 for p in c.get("ports") or [] if p.get("name")}
        out[component] = pod(NAMESPACE, labels(template), ports)
    return out


def port_of(r: Render, component: str) -> int:
    if component == "redis":
        return 6379
    return int(r.values[component]["port"])


def peer_endpoint(peer: dict[str, Any], default_namespace: str) -> Endpoint:
    """A pod that the NetworkPolicyPeer ``peer`` (matchLabels only) describes."""
    ns_labels = dict((peer.get("namespaceSelector") or {}).get("matchLabels") or {})
    namespace = ns_labels.get("kubernetes.io/metadata.name", default_namespace)
    pod_labels = dict((peer.get("podSelector") or {}).get("matchLabels") or {})
    return pod(namespace, pod_labels, namespace_labels=ns_labels)


def deployed(r: Render) -> list[str]:
    return [c for c in STAGES if r.component(c) is not None]


def policies(r: Render) -> list[Obj]:
    found = r.of("NetworkPolicy")
    assert found, "networkPolicy.enabled=true renders no NetworkPolicy"
    return found


def ok(r: Render, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return allowed(policies(r), src, dst, port, protocol, default_namespace=NAMESPACE)


@pytest.mark.parametrize("values", VALUES)
def test_orchestrator_reaches_stages_and_redis(values: str) -> None:
    r = rendered(values)
    eps = endpoints(r)
    for stage in deployed(r):
        assert ok(r, eps["orchestrator"], eps[stage], port_of(r, stage)), (
            f"orchestrator -> {stage}:{port_of(r, stage)} is blocked")
    if "redis" in eps:
        assert ok(r, eps["orchestrator"], eps["redis"], 6379), "orchestrator -> redis blocked"


@pytest.mark.parametrize("values", VALUES)
def test_stages_do_not_reach_each_other_or_redis(values: str) -> None:
    r = rendered(values)
    eps = endpoints(r)
    for a, b in itertools.permutations(deployed(r), 2):
        assert not ok(r, eps[a], eps[b], port_of(r, b)), f"{a} -> {b}:{port_of(r, b)} is open"
    if "redis" in eps:
        for stage in deployed(r):
            assert not ok(r, eps[stage], eps["redis"], 6379), f"{stage} -> redis is open"


@pytest.mark.parametrize("values", VALUES)
def test_nothing_else_reaches_stages_or_redis(values: str) -> None:
    r = rendered(values)
    eps = endpoints(r)
    neighbour = pod(NAMESPACE, {"app.kubernetes.io/name": "something-else"})
    foreign = pod("default", dict(eps["orchestrator"].labels))  # same labels, other namespace
    targets = [*deployed(r), *(["redis"] if "redis" in eps else [])]
    for target in targets:
        port = port_of(r, target)
        for name, src in (("outside", outside(INTERNET)), ("a neighbour pod", neighbour),
                          ("an orchestrator-labelled pod of another namespace", foreign)):
            assert not ok(r, src, eps[target], port), f"{name} -> {target}:{port} is open"


@pytest.mark.parametrize("values", VALUES)
def test_metrics_scrapers_reach_every_component_but_redis(values: str) -> None:
    r = rendered(values)
    eps = endpoints(r)
    scraper = peer_endpoint(r.values["networkPolicy"]["metricsFrom"], NAMESPACE)
    for component in ["orchestrator", *deployed(r)]:
        port = port_of(r, component)
        assert ok(r, scraper, eps[component], port), f"monitoring -> {component}:{port} blocked"
    if "redis" in eps:
        assert not ok(r, scraper, eps["redis"], 6379), "monitoring -> redis is open"
    # Another namespace's pods are not scrapers.
    for stage in deployed(r):
        assert not ok(r, pod("default", {}), eps[stage], port_of(r, stage)), stage


@pytest.mark.parametrize("values", VALUES)
def test_clients_reach_the_orchestrator(values: str) -> None:
    r = rendered(values)
    eps = endpoints(r)
    port = port_of(r, "orchestrator")
    sources = r.values["networkPolicy"]["orchestratorIngressFrom"]
    if not sources:
        assert ok(r, outside(INTERNET), eps["orchestrator"], port), "clients -> orchestrator"
    else:
        assert not ok(r, outside(INTERNET), eps["orchestrator"], port)
    if r.values["webrtc"]["mode"] == "hostNetwork":
        rng = r.values["webrtc"]["udpPortRange"]
        for media in (rng["min"], rng["max"]):
            assert ok(r, outside(INTERNET), eps["orchestrator"], media, "UDP"), media


@pytest.mark.parametrize("values", VALUES)
def test_orchestrator_egress(values: str) -> None:
    """DNS, the stages and Redis; an external stage's port; nothing else."""
    r = rendered(values)
    eps = endpoints(r)
    dns = peer_endpoint(r.values["networkPolicy"]["dns"], "kube-system")
    for protocol in ("UDP", "TCP"):
        assert ok(r, eps["orchestrator"], dns, 53, protocol), f"DNS over {protocol} blocked"
    external_ports: set[int] = set()
    for stage in STAGES:
        url = r.values[stage]["external"]["url"] if r.component(stage) is None else ""
        if url:
            parts = urlsplit(url.split(",")[0].strip())
            port = parts.port or (443 if parts.scheme == "https" else 80)
            external_ports.add(port)
            assert ok(r, eps["orchestrator"], outside(INTERNET), port), (
                f"orchestrator -> external {stage} ({url}) blocked")
    if r.values["redis"]["mode"] == "external":
        external_ports.add(int(urlsplit(r.values["redis"]["external"]["url"]).port
                               or r.values["redis"]["external"]["port"]))
    turn = r.values["webrtc"]["mode"] == "turn"
    probe_port = 9999
    if not turn and probe_port not in external_ports:
        assert not ok(r, eps["orchestrator"], outside(INTERNET), probe_port), (
            "the orchestrator may reach any address outside the cluster")
    # Not a neighbour's pods either.
    neighbour = pod(NAMESPACE, {"app.kubernetes.io/name": "something-else"},
                    ports={"http": 8080})
    assert not ok(r, eps["orchestrator"], neighbour, 8080), "orchestrator -> any pod is open"
