"""The NetworkPolicy evaluator itself, on hand-written policies with known answers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.helm import netpol
from tests.deploy.helm.netpol import allowed, outside, pod

APP = {"app": "cascade"}
ORCH = pod("prod", {**APP, "component": "orchestrator"})
ASR = pod("prod", {**APP, "component": "asr"}, ports={"http": 8001, "metrics": 9101})
TTS = pod("prod", {**APP, "component": "tts"}, ports={"http": 8003})
PROM = pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER_NS = pod("other", {**APP, "component": "orchestrator"})


def policy(name: str, pod_selector: dict[str, Any], *, ingress: list[Any] | None = None,
           egress: list[Any] | None = None, types: list[str] | None = None,
           namespace: str | None = "prod") -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": pod_selector}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": spec}


ASR_FROM_ORCH = policy(
    "asr", {"matchLabels": {"component": "asr"}},
    ingress=[{"from": [{"podSelector": {"matchLabels": {"component": "orchestrator"}}}],
              "ports": [{"port": "http"}]},
             {"from": [{"namespaceSelector": {
                 "matchLabels": {netpol.NAMESPACE_NAME: "monitoring"}}}],
              "ports": [{"port": 9101, "protocol": "TCP"}]}],
    types=["Ingress"])


def test_no_policy_allows_everything() -> None:
    assert allowed([], TTS, ASR, 8001)
    assert allowed([], outside("203.0.113.9"), ASR, 8001)


def test_ingress_rule_by_pod_selector_and_named_port() -> None:
    pols = [ASR_FROM_ORCH]
    assert allowed(pols, ORCH, ASR, 8001)
    assert not allowed(pols, ORCH, ASR, 8002), "8002 is not the named port http"
    assert not allowed(pols, ORCH, ASR, 8001, protocol="UDP")
    assert not allowed(pols, TTS, ASR, 8001), "tts is not selected by the from peer"
    assert not allowed(pols, OTHER_NS, ASR, 8001), "a bare podSelector is this namespace only"
    assert not allowed(pols, outside("10.0.0.1"), ASR, 8001)
    # A pod the policy does not select stays open.
    assert allowed(pols, TTS, ORCH, 8000)


def test_namespace_selector_and_numeric_port() -> None:
    pols = [ASR_FROM_ORCH]
    assert allowed(pols, PROM, ASR, 9101)
    assert not allowed(pols, PROM, ASR, 8001)
    assert not allowed(pols, pod("default", {}), ASR, 9101)


def test_namespace_and_pod_selector_in_one_peer_is_an_and() -> None:
    both = policy("p", {}, ingress=[{"from": [{
        "namespaceSelector": {"matchLabels": {netpol.NAMESPACE_NAME: "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]}])
    assert allowed([both], PROM, ASR, 9101)
    assert not allowed([both], pod("monitoring", {"app.kubernetes.io/name": "grafana"}),
                       ASR, 9101)
    # The same two selectors as two peers are an or.
    either = policy("p", {}, ingress=[{"from": [
        {"namespaceSelector": {"matchLabels": {netpol.NAMESPACE_NAME: "monitoring"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]}])
    assert allowed([either], pod("monitoring", {"app.kubernetes.io/name": "grafana"}),
                   ASR, 9101)


def test_empty_rules_and_deny_all() -> None:
    deny_all = policy("deny", {}, types=["Ingress"])
    assert not allowed([deny_all], ORCH, ASR, 8001)
    allow_all = policy("all", {}, ingress=[{}])
    assert allowed([allow_all], outside("198.51.100.1"), ASR, 8001)
    # Policies add up: deny-all plus one allow rule allows that path.
    assert allowed([deny_all, ASR_FROM_ORCH], ORCH, ASR, 8001)
    assert not allowed([deny_all, ASR_FROM_ORCH], ORCH, TTS, 8003)


def test_policy_in_another_namespace_does_not_apply() -> None:
    deny_elsewhere = policy("deny", {}, types=["Ingress"], namespace="other")
    assert allowed([deny_elsewhere], ORCH, ASR, 8001)
    assert not allowed([deny_elsewhere], ORCH, OTHER_NS, 8000)
    # A policy without a namespace lives in the release namespace given.
    unnamed = policy("deny", {}, types=["Ingress"], namespace=None)
    assert not allowed([unnamed], ORCH, ASR, 8001, default_namespace="prod")
    assert allowed([unnamed], ORCH, ASR, 8001, default_namespace="other")


def test_egress_isolation_needs_a_matching_to_rule() -> None:
    orch_egress = policy("orch", {"matchLabels": {"component": "orchestrator"}},
                         egress=[{"to": [{"podSelector": {"matchLabels": {"component": "asr"}}}],
                                  "ports": [{"port": 8001}]}])
    assert netpol.policy_types(orch_egress) == {"Ingress", "Egress"}
    pols = [orch_egress]
    assert allowed(pols, ORCH, ASR, 8001)
    assert not allowed(pols, ORCH, TTS, 8003)
    # Its implied Ingress type with no ingress rules isolates the orchestrator's ingress.
    assert not allowed(pols, TTS, ORCH, 8000)
    egress_only = policy("orch", {"matchLabels": {"component": "orchestrator"}},
                         egress=[], types=["Egress"])
    assert allowed([egress_only], TTS, ORCH, 8000)
    assert not allowed([egress_only], ORCH, ASR, 8001)


def test_port_ranges_and_protocol() -> None:
    ranged = policy("r", {}, ingress=[{"ports": [{"port": 8000, "endPort": 8003}]}])
    assert allowed([ranged], ORCH, ASR, 8003)
    assert not allowed([ranged], ORCH, ASR, 8004)
    dns = policy("dns", {}, egress=[{"ports": [{"port": 53, "protocol": "UDP"}]}],
                 types=["Egress"])
    kube_dns = pod("kube-system", {"k8s-app": "kube-dns"})
    assert allowed([dns], ORCH, kube_dns, 53, protocol="UDP")
    assert not allowed([dns], ORCH, kube_dns, 53, protocol="TCP")


@pytest.mark.parametrize(("address", "expected"), [
    ("10.1.2.3", True), ("10.9.0.5", False), ("192.0.2.1", False)])
def test_ip_block_with_except(address: str, expected: bool) -> None:
    block = policy("ip", {}, ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["10.9.0.0/16"]}}]}])
    assert allowed([block], outside(address), ASR, 8001) is expected


@pytest.mark.parametrize(("expr", "expected"), [
    ({"key": "component", "operator": "In", "values": ["asr", "tts"]}, True),
    ({"key": "component", "operator": "NotIn", "values": ["asr"]}, False),
    ({"key": "tier", "operator": "DoesNotExist"}, True),
    ({"key": "tier", "operator": "Exists"}, False),
])
def test_match_expressions(expr: dict[str, Any], expected: bool) -> None:
    assert netpol.selects({"matchExpressions": [expr]}, ASR.labels) is expected
