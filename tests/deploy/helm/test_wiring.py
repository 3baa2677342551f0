"""What refers to what inside a render: selectors, ports, Services, stage URLs, references.

kubernetes-validate accepts a Service whose selector matches no pod, a targetPort no
container has, a probe on a port that does not exist and a pod mounting a Secret the
chart never made; the API server accepts most of those too, and the release then simply
does not work. Each test here resolves one kind of reference in every render.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
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

VALUES = values_names()
STAGES = ("asr", "tts", "llm")
URL_ENV = {"asr": "CASCADE_ASR_URL", "tts": "CASCADE_TTS_URL", "llm": "CASCADE_LLM_URL"}


def matches(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """matchLabels/matchExpressions (or a Service's plain map) against labels."""
    from tests.deploy.helm.netpol import selects

    if "matchLabels" in selector or "matchExpressions" in selector:
        return selects(selector, pod_labels)
    return all(pod_labels.get(k) == v for k, v in selector.items())


def pods_selected(r: Render, selector: dict[str, Any]) -> list[Obj]:
    return [w for w, pod in r.pods() if matches(selector, labels(pod))]


def container_ports(pod: Obj) -> dict[str | int, int]:
    """Every container port of the pod by name and by number -> number."""
    out: dict[str | int, int] = {}
    for container in containers(pod, init=False):
        for port in container.get("ports") or []:
            out[int(port["containerPort"])] = int(port["containerPort"])
            if port.get("name"):
                out[port["name"]] = int(port["containerPort"])
    return out


def resolve_port(pod: Obj, target: str | int) -> int | None:
    return container_ports(pod).get(target if isinstance(target, str) else int(target))


def deployed(values: dict[str, Any], stage: str) -> bool:
    if stage == "llm":
        return bool(values["llm"]["mode"] in ("vllm", "cpu"))
    return bool(values[stage]["enabled"])


def env_map(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env") or []}


def orchestrator_container(r: Render) -> Obj:
    workload = r.component("orchestrator")
    assert workload is not None, "no orchestrator workload"
    main = [c for c in containers(workload["spec"]["template"], init=False)
            if c["name"] == "orchestrator"] or containers(workload["spec"]["template"], False)
    return main[0]


@pytest.mark.parametrize("values", VALUES)
def test_workload_selectors_match_their_pods(values: str) -> None:
    r = render(values)
    for workload, pod in r.pods():
        selector = workload["spec"]["selector"]
        assert matches(selector, labels(pod)), (
            f"{workload['metadata']['name']}: selector {selector} vs {labels(pod)}")
        # No other workload's pods may fall under this selector (ReplicaSets would fight).
        others = [w["metadata"]["name"] for w in pods_selected(r, selector) if w is not workload]
        assert not others, f"{workload['metadata']['name']} also selects {others}"
        if workload["kind"] == "StatefulSet":
            service = r.get("Service", workload["spec"]["serviceName"])
            assert service is not None, f"StatefulSet service {workload['spec']['serviceName']}"


@pytest.mark.parametrize("values", VALUES)
def test_services_select_pods_and_target_real_ports(values: str) -> None:
    r = render(values)
    for service in r.of("Service"):
        name = service["metadata"]["name"]
        selected = pods_selected(r, service["spec"].get("selector") or {})
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        pod = selected[0]["spec"]["template"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert resolve_port(pod, target) is not None, (
                f"Service {name} port {port['port']} -> targetPort {target!r}: no such "
                f"container port in {selected[0]['metadata']['name']} "
                f"({sorted(map(str, container_ports(pod)))})")


@pytest.mark.parametrize("values", VALUES)
def test_probes_use_real_container_ports(values: str) -> None:
    r = render(values)
    for workload, pod in r.pods():
        for container in containers(pod, init=False):
            own = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            numbers = set(own.values())
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if not probe:
                    continue
                handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if handler is None:
                    continue  # exec probes
                port = handler["port"]
                ok = port in own if isinstance(port, str) else int(port) in numbers
                assert ok, (f"{workload['metadata']['name']}/{container['name']} {kind} on "
                            f"port {port!r}: not a port of that container ({own})")


@pytest.mark.parametrize("values", VALUES)
def test_every_deployed_component_serves_readiness(values: str) -> None:
    """Each cascade container is ready on /readyz (models loaded); vLLM on /health."""
    r = render(values)
    for workload, pod in r.pods():
        component = labels(pod).get(COMPONENT_LABEL)
        if component == "redis":
            continue
        main = containers(pod, init=False)[0]
        probe = main.get("readinessProbe") or {}
        path = (probe.get("httpGet") or {}).get("path")
        want = "/health" if "vllm" in main["image"] else "/readyz"
        assert path == want, f"{workload['metadata']['name']}: readiness {probe}"


@pytest.mark.parametrize("values", VALUES)
def test_pdbs_select_exactly_one_workload(values: str) -> None:
    r = render(values)
    for pdb in r.of("PodDisruptionBudget"):
        selected = pods_selected(r, pdb["spec"]["selector"])
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)}"
        spec = pdb["spec"]
        if "minAvailable" in spec and isinstance(spec["minAvailable"], int):
            replicas = selected[0]["spec"].get("replicas", 1)
            assert spec["minAvailable"] < replicas, "a PDB that can never allow an eviction"


@pytest.mark.parametrize("values", VALUES)
def test_network_policies_select_pods(values: str) -> None:
    r = render(values, set_args=("--set", "networkPolicy.enabled=true"))
    assert r.of("NetworkPolicy"), "networkPolicy.enabled renders no NetworkPolicy"
    for policy in r.of("NetworkPolicy"):
        assert pods_selected(r, policy["spec"]["podSelector"]), (
            f"NetworkPolicy {policy['metadata']['name']} selects no pod of the release")


def autoscaler_targets(r: Render) -> Iterator[tuple[str, Obj]]:
    for hpa in r.of("HorizontalPodAutoscaler"):
        yield f"HPA {hpa['metadata']['name']}", hpa["spec"]["scaleTargetRef"]
    for so in r.of("ScaledObject"):
        ref = dict(so["spec"]["scaleTargetRef"])
        ref.setdefault("kind", "Deployment")
        ref.setdefault("apiVersion", "apps/v1")
        yield f"ScaledObject {so['metadata']['name']}", ref


@pytest.mark.parametrize("values", VALUES)
def test_autoscalers_target_rendered_workloads(values: str) -> None:
    r = render(values)
    for what, ref in autoscaler_targets(r):
        target = r.get(ref["kind"], ref["name"])
        assert target is not None, f"{what} targets missing {ref['kind']}/{ref['name']}"
        assert ref["apiVersion"] == target["apiVersion"], f"{what}: {ref} vs {target['apiVersion']}"


@pytest.mark.parametrize("values", VALUES)
def test_service_monitors_select_services_and_ports(values: str) -> None:
    r = render(values, set_args=("--set", "metrics.serviceMonitor.enabled=true"))
    monitors = r.of("ServiceMonitor")
    assert monitors, "metrics.serviceMonitor.enabled renders no ServiceMonitor"
    monitored: set[str] = set()
    for monitor in monitors:
        name = monitor["metadata"]["name"]
        spec = monitor["spec"]
        namespaces = (spec.get("namespaceSelector") or {}).get("matchNames")
        assert namespaces in (None, [NAMESPACE]), f"{name}: namespaceSelector {namespaces}"
        services = [s for s in r.of("Service") if matches(spec["selector"], labels(s))]
        assert services, f"ServiceMonitor {name} selects no Service ({spec['selector']})"
        for endpoint in spec["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            for service in services:
                names = [p.get("name") for p in service["spec"]["ports"]]
                assert endpoint.get("port") in names, (
                    f"{name}: endpoint port {endpoint.get('port')!r} is not a named port of "
                    f"Service {service['metadata']['name']} ({names})")
            for key in ("interval", "scrapeTimeout"):
                if key in endpoint:
                    assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint[key]), endpoint[key]
        monitored |= {labels(s).get(COMPONENT_LABEL, "") for s in services}
    expected = {labels(pod).get(COMPONENT_LABEL) for _, pod in r.pods()} - {"redis"}
    assert expected <= monitored, f"components without a ServiceMonitor: {expected - monitored}"


def service_for_host(r: Render, host: str) -> Obj | None:
    """The Service a cluster DNS name names: NAME, NAME.NS, NAME.NS.svc[.cluster.local]."""
    parts = host.split(".")
    name = parts[0]
    rest = parts[1:]
    if rest and rest[0] != NAMESPACE:
        return None
    if rest[1:] not in ([], ["svc"], ["svc", "cluster", "local"]):
        return None
    return r.get("Service", name)


@pytest.mark.parametrize("values", VALUES)
def test_orchestrator_reaches_each_stage(values: str) -> None:
    """CASCADE_{ASR,TTS,LLM}_URL name headless Services of this release that select that
    stage's pods on the stage's container port, or the external URL of a stage run
    elsewhere."""
    r = render(values)
    env = env_map(orchestrator_container(r))
    for stage in STAGES:
        var = env.get(URL_ENV[stage])
        assert var is not None and "value" in var, f"{URL_ENV[stage]} not set: {var}"
        url = var["value"]
        if not deployed(r.values, stage):
            assert url == r.values[stage]["external"]["url"], (stage, url)
            assert r.component(stage) is None, f"{stage} is external but deployed too"
            continue
        for one in url.split(","):
            parts = urlsplit(one.strip())
            assert parts.scheme == "http" and parts.hostname and parts.port, one
            service = service_for_host(r, parts.hostname)
            assert service is not None, f"{stage}: {one}: no Service {parts.hostname}"
            sname = service["metadata"]["name"]
            assert service["spec"].get("clusterIP") == "None", (
                f"{stage}: {sname} is not headless: the orchestrator needs one address per "
                "pod to route by load")
            selected = pods_selected(r, service["spec"]["selector"])
            assert [labels(w["spec"]["template"]).get(COMPONENT_LABEL)
                    for w in selected] == [stage], f"{sname} selects {selected}"
            pod = selected[0]["spec"]["template"]
            # A headless Service forwards nothing: the URL's port is the pod's port itself.
            assert parts.port in set(container_ports(pod).values()), (
                f"{stage}: {one}: port {parts.port} is not a container port of {stage}")
            service_ports = [p["port"] for p in service["spec"]["ports"]]
            assert parts.port in service_ports, (stage, one, service_ports)
            if stage == "llm":
                assert parts.path == "/v1", f"the LLM URL is an OpenAI base URL: {one}"


def secret_keys(r: Render) -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s.get("data") or {}) | set(s.get("stringData") or {})
            for s in r.of("Secret")}


def existing_names(values: Any) -> set[str]:
    """Every existingSecret / existingClaim / name of an existing object in the values."""
    found: set[str] = set()
    if isinstance(values, dict):
        for key, value in values.items():
            if key.startswith("existing") and isinstance(value, str) and value \
                    and not key.endswith("Key"):
                found.add(value)
            found |= existing_names(value)
    elif isinstance(values, list):
        for item in values:
            found |= existing_names(item)
    return found


def references(pod: Obj) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) for every ConfigMap/Secret/PVC the pod uses."""
    spec = pod["spec"]
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], None, bool(
                volume["configMap"].get("optional"))
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], None, bool(
                volume["secret"].get("optional"))
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], \
                None, False
        for source in (volume.get("projected") or {}).get("sources") or []:
            for kind, key in (("configMap", "ConfigMap"), ("secret", "Secret")):
                if kind in source:
                    yield key, source[kind]["name"], None, bool(source[kind].get("optional"))
    for container in containers(pod):
        for env in container.get("env") or []:
            source = env.get("valueFrom") or {}
            for kind, key in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if kind in source:
                    ref = source[kind]
                    yield key, ref["name"], ref["key"], bool(ref.get("optional"))
        for env_from in container.get("envFrom") or []:
            for kind, key in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if kind in env_from:
                    yield key, env_from[kind]["name"], None, bool(env_from[kind].get("optional"))


@pytest.mark.parametrize("values", VALUES)
def test_the_stage_key_reaches_every_stage_and_the_orchestrator(values: str) -> None:
    """stageAuth.enabled: the orchestrator (which sends it) and every deployed stage (which
    require it: CASCADE_STAGE_API_KEY, vLLM's VLLM_API_KEY) read one key from one Secret
    entry; off, no pod has it (the stages then trust the NetworkPolicies)."""
    r = render(values)
    auth = r.values["stageAuth"]
    refs: dict[str, Any] = {"orchestrator": env_map(orchestrator_container(r)).get(
        "CASCADE_STAGE_API_KEY")}
    for stage in STAGES:
        workload = r.component(stage)
        if workload is None:
            continue
        var = "VLLM_API_KEY" if stage == "llm" and r.values["llm"]["mode"] == "vllm" else (
            "CASCADE_STAGE_API_KEY")
        main = containers(workload["spec"]["template"], init=False)[0]
        refs[stage] = env_map(main).get(var)
    if not auth["enabled"]:
        assert all(ref is None for ref in refs.values()), refs
        return
    assert len(refs) > 1, "no stage deployed: nothing to check"
    sources = set()
    for who, ref in refs.items():
        assert ref is not None, f"{who} has no stage key"
        secret = ref["valueFrom"]["secretKeyRef"]
        sources.add((secret["name"], secret["key"]))
    assert len(sources) == 1, sources
    if auth["existingSecret"]:
        assert sources == {(auth["existingSecret"], auth["existingSecretKey"])}
    else:
        (name, key), = sources
        secret = next(o for o in r.objects
                      if o["kind"] == "Secret" and o["metadata"]["name"] == name)
        assert key in secret["data"]
        if auth["key"]:
            assert base64.b64decode(secret["data"][key]).decode() == auth["key"]


@pytest.mark.parametrize("values", VALUES)
def test_referenced_configmaps_secrets_and_claims_exist(values: str) -> None:
    r = render(values)
    existing = existing_names(r.values)
    keys = secret_keys(r)
    for workload, pod in r.pods():
        where = workload["metadata"]["name"]
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates") or []}
        for kind, name, key, optional in references(pod):
            if name in existing or (kind == "PersistentVolumeClaim" and name in claims):
                continue
            obj = r.get(kind, name)
            assert obj is not None or optional, (
                f"{where} uses {kind} {name!r}: neither rendered nor a configured existing one")
            if obj is not None and kind == "Secret" and key is not None:
                assert key in keys[name], f"{where}: Secret {name} has no key {key!r}"
            if obj is not None and kind == "ConfigMap" and key is not None:
                assert key in (obj.get("data") or {}), f"{where}: ConfigMap {name} lacks {key}"
        account = pod["spec"].get("serviceAccountName")
        if account and r.values["serviceAccount"]["create"]:
            assert r.get("ServiceAccount", account) is not None, f"{where}: {account}"


PORT_ENV = {"orchestrator": ("CASCADE_HOST", "CASCADE_PORT"), "asr": ("CASCADE_ASR_HOST",
            "CASCADE_ASR_PORT"), "tts": ("CASCADE_TTS_HOST", "CASCADE_TTS_PORT"),
            "llm": ("CASCADE_LLM_HOST", "CASCADE_LLM_PORT")}


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in a server's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return str(args[i + 1])
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("values", VALUES)
def test_servers_listen_where_the_pod_says(values: str) -> None:
    """Each server is told to listen on all interfaces on its declared container port (an
    image default that differs would leave the Service and the probes knocking on a
    closed port), and the orchestrator asks the LLM for the model name it serves."""
    r = render(values)
    for component, (host_var, port_var) in PORT_ENV.items():
        workload = r.component(component)
        if workload is None:
            continue
        main = containers(workload["spec"]["template"], init=False)[0]
        port = int(main["ports"][0]["containerPort"])
        env = {e["name"]: e.get("value") for e in main.get("env") or []}
        args = [str(a) for a in main.get("args") or []]
        if "cascade-" in main["image"]:
            assert env.get(port_var) == str(port), (component, port_var, env.get(port_var), port)
            assert env.get(host_var) == "0.0.0.0", (component, host_var, env.get(host_var))
        else:  # vLLM's server takes flags
            assert flag(args, "--port") == str(port), (component, args)
            assert flag(args, "--host") == "0.0.0.0", (component, args)
    orchestrator_env = env_map(orchestrator_container(r))
    model = (orchestrator_env.get("CASCADE_LLM_MODEL") or {}).get("value")
    llm = r.component("llm")
    if llm is not None:
        main = containers(llm["spec"]["template"], init=False)[0]
        env = {e["name"]: e.get("value") for e in main.get("env") or []}
        served = (env.get("CASCADE_LLM_SERVED_MODEL_NAME") if "cascade-" in main["image"]
                  else flag([str(a) for a in main.get("args") or []], "--served-model-name"))
        assert served and model == served, f"orchestrator asks for {model!r}, LLM serves {served!r}"
    elif r.values["llm"]["mode"] == "external":
        assert model == r.values["llm"]["external"]["model"], model


@pytest.mark.parametrize("values", VALUES)
def test_spread_and_affinity_selectors_select_their_own_pods(values: str) -> None:
    """A topology spread constraint or (anti-)affinity term whose labelSelector misses the
    pod's own labels spreads nothing."""
    r = render(values)
    for workload, pod in r.pods():
        own = labels(pod)
        component = own.get(COMPONENT_LABEL)
        for constraint in pod["spec"].get("topologySpreadConstraints") or []:
            assert matches(constraint["labelSelector"], own), (workload["metadata"]["name"],
                                                               constraint)
            for key in constraint.get("matchLabelKeys") or []:
                assert key in own or (key == "pod-template-hash"
                                      and workload["kind"] == "Deployment"), (component, key)
        affinity = pod["spec"].get("affinity") or {}
        for kind in ("podAntiAffinity",):
            rules = affinity.get(kind) or {}
            terms = list(rules.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
            terms += [t["podAffinityTerm"] for t in
                      rules.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
            for term in terms:
                assert matches(term["labelSelector"], own), (component, term)


@pytest.mark.parametrize("values", VALUES)
def test_ingress_backends_exist(values: str) -> None:
    r = render(values, set_args=("--set", "orchestrator.ingress.enabled=true"))
    ingresses = r.of("Ingress")
    assert ingresses, "orchestrator.ingress.enabled renders no Ingress"
    for ingress in ingresses:
        for rule in ingress["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = path["backend"]["service"]
                service = r.get("Service", backend["name"])
                assert service is not None, backend
                port = backend["port"]
                ports = service["spec"]["ports"]
                assert any(p.get("name") == port.get("name") if "name" in port
                           else p["port"] == port.get("number") for p in ports), (backend, ports)
