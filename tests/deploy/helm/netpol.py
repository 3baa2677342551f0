"""A NetworkPolicy evaluator: is traffic from A to B on a port allowed by these policies?

Kubernetes' semantics (networking.k8s.io/v1), as a conforming CNI plugin enforces them:

- A pod is isolated for ingress (egress) when at least one policy in its namespace selects
  it by ``podSelector`` and has ``Ingress`` (``Egress``) in its ``policyTypes``. Without
  ``policyTypes`` a policy has ``Ingress``, plus ``Egress`` when it has an ``egress`` section.
- Traffic to an isolated pod is allowed when some rule of a policy selecting it allows it;
  policies are additive (a union), there are no deny rules. A rule with no ``from``/``to``
  matches every peer; one with no ``ports`` matches every port.
- A peer is ``podSelector`` (pods of the policy's own namespace), ``namespaceSelector``
  (every pod of the matching namespaces), both in one peer (those pods of those
  namespaces), or ``ipBlock`` (addresses in ``cidr`` and not in ``except``).
- A port is a number or the name of a container port of the destination pod, with
  ``endPort`` for a range, and ``protocol`` (default TCP).
- A connection needs both: egress allowed from the source and ingress allowed at the
  destination. Traffic from outside the cluster has no egress side.

Label selectors take ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists,
DoesNotExist); ``{}`` selects everything, a missing ``podSelector`` in a peer with a
``namespaceSelector`` means every pod there. Namespaces carry the automatic label
``kubernetes.io/metadata.name``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]
NAMESPACE_NAME = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (``namespace`` set) or an address outside the
    cluster (``namespace`` None; only ``ipBlock`` peers can match it)."""

    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    # The pod's named container ports (name -> number), for policies that name a port.
    ports: Mapping[str, int] = field(default_factory=dict)
    ip: str | None = None

    def ns_labels(self) -> dict[str, str]:
        labels = dict(self.namespace_labels)
        if self.namespace is not None:
            labels.setdefault(NAMESPACE_NAME, self.namespace)
        return labels


def pod(namespace: str, labels: Mapping[str, str], ports: Mapping[str, int] | None = None,
        namespace_labels: Mapping[str, str] | None = None, ip: str | None = None) -> Endpoint:
    return Endpoint(namespace, dict(labels), dict(namespace_labels or {}), dict(ports or {}), ip)


def outside(ip: str) -> Endpoint:
    return Endpoint(None, ip=ip)


def selects(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector against a label set; None (absent) selects nothing here —
    callers decide what an absent selector means in their context."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], list(expr.get("values") or [])
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError(f"unknown selector operator {op!r}")
        if not ok:
            return False
    return True


def policy_types(policy: Obj) -> set[str]:
    spec = policy.get("spec") or {}
    types = spec.get("policyTypes")
    if types:
        return set(types)
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


def _namespace(policy: Obj, default: str) -> str:
    ns = (policy.get("metadata") or {}).get("namespace")
    return str(ns) if ns else default


def _selecting(policies: Iterable[Obj], target: Endpoint, direction: str,
               default_namespace: str) -> list[Obj]:
    if target.namespace is None:
        return []
    return [p for p in policies
            if _namespace(p, default_namespace) == target.namespace
            and direction in policy_types(p)
            and selects((p.get("spec") or {}).get("podSelector") or {}, target.labels)]


def peer_matches(peer: Obj, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        if address not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(address in ipaddress.ip_network(ex, strict=False)
                       for ex in block.get("except") or [])
    if other.namespace is None:
        return False  # pod/namespace selectors never match traffic from outside
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None and pod_sel is None:
        raise ValueError(f"empty NetworkPolicy peer {peer!r}")
    if ns_sel is None:
        in_namespace = other.namespace == policy_namespace
    else:
        in_namespace = selects(ns_sel, other.ns_labels())
    return in_namespace and selects(pod_sel if pod_sel is not None else {}, other.labels)


def port_matches(rule_ports: list[Obj] | None, port: int, protocol: str,
                 named: Mapping[str, int]) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        want = entry.get("port")
        if want is None:
            return True  # every port of that protocol
        if isinstance(want, str):  # a container port's name on the destination pod
            if named.get(want) == port:
                return True
            continue
        low = int(want)
        high = int(entry.get("endPort", low))
        if low <= port <= high:
            return True
    return False


def _rule_allows(rules: list[Obj], peers_key: str, other: Endpoint, port: int, protocol: str,
                 named: Mapping[str, int], policy_namespace: str) -> bool:
    for rule in rules:
        peers = rule.get(peers_key)
        peer_ok = not peers or any(peer_matches(p, other, policy_namespace) for p in peers)
        if peer_ok and port_matches(rule.get("ports"), port, protocol, named):
            return True
    return False


def ingress_allowed(policies: list[Obj], src: Endpoint, dst: Endpoint, port: int,
                    protocol: str = "TCP", default_namespace: str = "default") -> bool:
    selecting = _selecting(policies, dst, "Ingress", default_namespace)
    if not selecting:
        return True
    return any(_rule_allows(list((p.get("spec") or {}).get("ingress") or []), "from", src,
                            port, protocol, dst.ports, _namespace(p, default_namespace))
               for p in selecting)


def egress_allowed(policies: list[Obj], src: Endpoint, dst: Endpoint, port: int,
                   protocol: str = "TCP", default_namespace: str = "default") -> bool:
    selecting = _selecting(policies, src, "Egress", default_namespace)
    if not selecting:
        return True
    return any(_rule_allows(list((p.get("spec") or {}).get("egress") or []), "to", dst,
                            port, protocol, dst.ports, _namespace(p, default_namespace))
               for p in selecting)


def allowed(policies: list[Obj], src: Endpoint, dst: Endpoint, port: int,
            protocol: str = "TCP", default_namespace: str = "default") -> bool:
    """Whether ``src`` may open a connection to ``dst`` on ``port``/``protocol``."""
    return (egress_allowed(policies, src, dst, port, protocol, default_namespace)
            and ingress_allowed(policies, src, dst, port, protocol, default_namespace))


def network_policies(objects: Iterable[Obj]) -> list[Obj]:
    return [o for o in objects if o.get("kind") == "NetworkPolicy"]
