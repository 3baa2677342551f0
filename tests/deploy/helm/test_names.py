"""Names and labels in every render are ones the API server accepts.

kubernetes-validate checks types and fields, not these formats: object names (DNS-1123
subdomains, 253 characters; Services RFC 1035 labels, 63), label keys and values (63),
container, volume and port names — with the chart's release name and with Helm's longest
one (53 characters), so the chart's truncation is tested too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.deploy.helm.chart import (
    LONG_RELEASE,
    NAMESPACE,
    RELEASE,
    Obj,
    Render,
    containers,
    labels,
    render,
    values_names,
)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# IANA service name: what a container port's name must be (referenced by Services/probes).
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z]$")

# Kinds whose name must be a DNS-1123 label of at most this many characters; every other
# kind is a DNS-1123 subdomain (253). Services are RFC 1035 labels (the name is a DNS label
# in the cluster domain). A StatefulSet's pods carry the label
# controller-revision-hash=<name>-<10 character hash>, which must stay within 63.
def port_name_ok(name: str) -> bool:
    return len(name) <= 15 and PORT_NAME.match(name) is not None


LABEL_KINDS = {"Service": 63, "Deployment": 63, "StatefulSet": 52, "DaemonSet": 63,
               "Job": 63}


def name_problems(obj: Obj) -> Iterator[str]:
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Service":
        if len(name) > 63 or not RFC1035_LABEL.match(name):
            yield f"Service name {name!r} ({len(name)}) is not an RFC 1035 label (<= 63)"
    elif kind in LABEL_KINDS:
        if len(name) > LABEL_KINDS[kind] or not DNS1123_LABEL.match(name):
            yield (f"{kind} name {name!r} ({len(name)}) is not a DNS-1123 label of at most "
                   f"{LABEL_KINDS[kind]}")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        yield f"{kind} name {name!r} is not a DNS-1123 subdomain"


def label_problems(where: str, label_map: dict[str, str]) -> Iterator[str]:
    for key, value in label_map.items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
            yield f"{where}: label key prefix {prefix!r}"
        if len(name) > 63 or not LABEL_NAME.match(name):
            yield f"{where}: label key {key!r}"
        value = str(value)
        if value and (len(value) > 63 or not LABEL_NAME.match(value)):
            yield f"{where}: label {key}={value!r} ({len(value)} characters)"


def selector_labels(obj: Obj) -> Iterator[tuple[str, dict[str, str]]]:
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind == "Service" and spec.get("selector"):
        yield "selector", dict(spec["selector"])
    for key in ("selector", "podSelector"):
        sel = spec.get(key)
        if isinstance(sel, dict) and isinstance(sel.get("matchLabels"), dict):
            yield f"{key}.matchLabels", dict(sel["matchLabels"])
    template = spec.get("template")
    if isinstance(template, dict):
        yield "pod template labels", labels(template)


def problems(r: Render) -> list[str]:
    found: list[str] = []
    for obj in r.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        found += name_problems(obj)
        found += label_problems(where, labels(obj))
        for what, label_map in selector_labels(obj):
            found += label_problems(f"{where} {what}", label_map)
    for workload, pod in r.pods():
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        for container in containers(pod):
            if len(container["name"]) > 63 or not DNS1123_LABEL.match(container["name"]):
                found.append(f"{where}: container name {container['name']!r}")
            for port in container.get("ports") or []:
                port_name = port.get("name")
                if port_name is not None and not port_name_ok(port_name):
                    found.append(f"{where}: port name {port_name!r} (IANA_SVC_NAME, <= 15)")
        for volume in pod["spec"].get("volumes") or []:
            if len(volume["name"]) > 63 or not DNS1123_LABEL.match(volume["name"]):
                found.append(f"{where}: volume name {volume['name']!r}")
    return found


def duplicates(r: Render) -> list[str]:
    counts = Counter((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in r.objects)
    return [f"{k[1]}/{k[2]} rendered {n} times" for k, n in counts.items() if n > 1]


@pytest.mark.parametrize("release", [RELEASE, LONG_RELEASE], ids=["release", "long-release"])
@pytest.mark.parametrize("values", values_names())
def test_names_and_labels_are_valid(values: str, release: str) -> None:
    r = render(values, release=release)
    assert not problems(r), "\n".join(problems(r))
    assert not duplicates(r), duplicates(r)


@pytest.mark.parametrize("values", values_names())
def test_every_object_names_its_namespace_or_none(values: str) -> None:
    """Objects follow the release namespace (helm -n): none pins another one."""
    r = render(values)
    pinned = {f"{o['kind']}/{o['metadata']['name']}": o["metadata"].get("namespace")
              for o in r.objects}
    wrong = {k: v for k, v in pinned.items() if v not in (None, NAMESPACE)}
    assert not wrong, wrong


def test_checks_catch_bad_names() -> None:
    """The format checks themselves reject what the API server rejects."""
    too_long = {"kind": "Service", "metadata": {"name": "a" * 64}}
    assert list(name_problems(too_long))
    assert list(name_problems({"kind": "Service", "metadata": {"name": "1abc"}}))
    assert not list(name_problems({"kind": "ConfigMap", "metadata": {"name": "a.b-c"}}))
    assert list(name_problems({"kind": "StatefulSet", "metadata": {"name": "r" * 53}}))
    assert list(label_problems("x", {"app": "v" * 64}))
    assert list(label_problems("x", {"app": "-bad"}))
    assert not list(label_problems("x", {"app.kubernetes.io/name": "ok_1.2"}))
    assert not port_name_ok("http--x") and not port_name_ok("8001")
    assert port_name_ok("http") and port_name_ok("metrics-2")
    assert not port_name_ok("a-very-long-port-name") and not port_name_ok("-http")
