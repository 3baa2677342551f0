"""The chart's rendered containers as things to run: argv, environment, probes, shutdown.

Reads ``helm template`` output and, for each workload's main container, works out what
the kubelet would hand the container runtime: the environment with secretKeyRef and
configMapKeyRef resolved from the rendered Secrets and ConfigMaps, downward-API fieldRefs
filled in (pod and node addresses: 127.0.0.1), ``$(VAR)`` references expanded in env
values, command and args (Kubernetes' rules: ``command`` replaces the image's ENTRYPOINT,
``args`` its CMD; the image's own are read from deploy/images/NAME/Dockerfile), its ports,
readiness and startup probes, emptyDir mounts, security context, memory limit,
terminationGracePeriodSeconds and preStop sleep, and the Service names (short and
qualified) that reach its pod.

Used by tests/deploy/helm/test_rendered_processes.py (local processes, run_local.py) and
deploy/helm/run-rendered.sh (Docker containers: ``python rendered.py docker-plan``).
Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
COMPONENT = "app.kubernetes.io/component"
LOOPBACK = "127.0.0.1"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
# Downward-API fields (fieldRef) a single-host run can give a value.
ADDRESS_FIELDS = {"status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs"}
REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
                "G": 10**9, "T": 10**12, "": 1}

Obj = dict[str, Any]


class RenderProblem(ValueError):
    """The render cannot run as it is (a reference the kubelet could not resolve either)."""


@dataclass
class Probe:
    kind: str  # "http", "tcp" or "exec"
    port: int | None = None
    path: str = "/"
    command: list[str] = field(default_factory=list)
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3

    def budget_s(self) -> float:
        return self.period_s * self.failure_threshold

    def describe(self) -> str:
        if self.kind == "http":
            return f"GET :{self.port}{self.path}"
        if self.kind == "tcp":
            return f"TCP :{self.port}"
        return "exec " + " ".join(self.command)


@dataclass
class Mount:
    name: str
    path: str
    kind: str  # the volume's source: emptyDir, secret, configMap, persistentVolumeClaim...
    read_only: bool = False


@dataclass
class Image:
    """What a Dockerfile of deploy/images gives its image: ENTRYPOINT, CMD, ENV, USER."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    dockerfile: Path | None = None


@dataclass
class Spec:
    """One rendered container, resolved."""

    component: str
    workload: str
    pod: str
    container: str
    image: str
    command: list[str] | None
    args: list[str] | None
    argv: list[str]  # what the runtime executes (image ENTRYPOINT/CMD applied)
    env: dict[str, str]  # the container's own variables, in order, resolved
    secret_env: set[str]  # those that came from Secrets (never printed)
    ports: dict[str, int]
    readiness: Probe | None
    startup: Probe | None
    grace_s: int
    prestop_s: int
    mounts: list[Mount]
    security: dict[str, Any]  # pod securityContext overlaid with the container's
    memory_limit: int | None
    aliases: list[str]  # DNS names of the Services that select the pod
    image_info: Image

    def port_of(self, probe: Probe | None) -> int | None:
        return None if probe is None else probe.port


def load(text: str) -> list[Obj]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if isinstance(d, dict)]


def labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def secret_data(objects: list[Obj]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for obj in objects:
        if obj.get("kind") != "Secret":
            continue
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: str(v) for k, v in (obj.get("stringData") or {}).items()})
        out[obj["metadata"]["name"]] = data
    return out


def configmap_data(objects: list[Obj]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: {k: str(v) for k, v in (o.get("data") or {}).items()}
            for o in objects if o.get("kind") == "ConfigMap"}


def expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables replaced, $$ -> $, others kept."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return REFERENCE.sub(one, value)


def field_value(path: str, pod: str, namespace: str, pod_spec: Obj) -> str:
    if path in ADDRESS_FIELDS:
        return LOOPBACK
    if path == "metadata.name":
        return pod
    if path == "metadata.namespace":
        return namespace
    if path == "spec.nodeName":
        return "localhost"
    if path == "spec.serviceAccountName":
        return str(pod_spec.get("serviceAccountName", "default"))
    raise RenderProblem(f"fieldRef {path} has no value in a single-host run")


def resolve_env(container: Obj, pod: str, namespace: str, pod_spec: Obj,
                secrets: Mapping[str, Mapping[str, str]],
                configmaps: Mapping[str, Mapping[str, str]]) -> tuple[dict[str, str], set[str]]:
    env: dict[str, str] = {}
    from_secrets: set[str] = set()
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, store in (("secretRef", secrets), ("configMapRef", configmaps)):
            if kind in source:
                ref = source[kind]
                if ref["name"] not in store:
                    if ref.get("optional"):
                        continue
                    raise RenderProblem(f"envFrom {kind} {ref['name']} is not in the render")
                for key, value in store[ref["name"]].items():
                    env[prefix + key] = value
                    if kind == "secretRef":
                        from_secrets.add(prefix + key)
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            if any(m.group(1) in from_secrets for m in REFERENCE.finditer(str(item["value"]))):
                from_secrets.add(name)
            continue
        source = item.get("valueFrom") or {}
        if not source:
            env[name] = ""
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            store = secrets if kind == "secretKeyRef" else configmaps
            found = (store.get(ref["name"]) or {}).get(ref["key"])
            if found is None:
                if ref.get("optional"):
                    continue
                raise RenderProblem(f"{name}: {kind} {ref['name']}/{ref['key']} is not in the "
                                    "render (an existing Secret: give its value)")
            env[name] = found
            if kind == "secretKeyRef":
                from_secrets.add(name)
        elif "fieldRef" in source:
            env[name] = field_value(source["fieldRef"]["fieldPath"], pod, namespace, pod_spec)
        else:
            raise RenderProblem(f"{name}: valueFrom {sorted(source)} is not supported")
    return env, from_secrets


def dockerfile_for(image: str) -> Path | None:
    """deploy/images/NAME/Dockerfile for an image cascade-NAME[:tag][@digest]."""
    repo = image.split("@")[0]
    last = repo.rsplit("/", 1)[-1]
    name = last.split(":")[0]
    if not name.startswith("cascade-"):
        return None
    path = IMAGES / name.removeprefix("cascade-") / "Dockerfile"
    return path if path.exists() else None


def parse_dockerfile(path: Path) -> Image:
    """ENTRYPOINT, CMD (exec form), ENV and USER of the final stage."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending or line:
            logical.append(pending + line)
        pending = ""
    image = Image(dockerfile=path)
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            image = Image(dockerfile=path)  # a new stage: only the last one counts
        elif keyword in ("CMD", "ENTRYPOINT"):
            if not rest.startswith("["):
                raise RenderProblem(f"{path}: {keyword} is not in exec form")
            words = [str(w) for w in json.loads(rest)]
            if keyword == "CMD":
                image.cmd = words
            else:
                image.entrypoint = words
        elif keyword == "ENV":
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                if sep:
                    image.env[key] = value
        elif keyword == "USER":
            image.user = rest
    return image


def image_info(image: str) -> Image:
    path = dockerfile_for(image)
    return parse_dockerfile(path) if path is not None else Image()


def runtime_argv(command: list[str] | None, args: list[str] | None, image: Image) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD), args replace CMD."""
    if command:
        return [*command, *(args or [])]
    if args is not None and args:
        return [*image.entrypoint, *args]
    return [*image.entrypoint, *image.cmd]


def probe(spec: Obj | None, ports: Mapping[str, int]) -> Probe | None:
    if not spec:
        return None
    period = float(spec.get("periodSeconds", 10))
    timeout = float(spec.get("timeoutSeconds", 1))
    threshold = int(spec.get("failureThreshold", 3))

    def number(port: str | int) -> int:
        if isinstance(port, int):
            return port
        if port not in ports:
            raise RenderProblem(f"probe port {port!r} is not a container port")
        return ports[port]

    if "httpGet" in spec:
        http = spec["httpGet"]
        return Probe("http", number(http["port"]), str(http.get("path", "/")),
                     period_s=period, timeout_s=timeout, failure_threshold=threshold)
    if "tcpSocket" in spec:
        return Probe("tcp", number(spec["tcpSocket"]["port"]), period_s=period,
                     timeout_s=timeout, failure_threshold=threshold)
    if "exec" in spec:
        return Probe("exec", command=[str(c) for c in spec["exec"]["command"]],
                     period_s=period, timeout_s=timeout, failure_threshold=threshold)
    raise RenderProblem(f"unsupported probe {sorted(spec)}")


def prestop_seconds(container: Obj) -> int:
    hook = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    if hook:
        raise RenderProblem(f"unsupported preStop hook {hook}")
    return 0


def memory_bytes(quantity: str | int | None) -> int | None:
    if quantity is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(quantity))
    if match is None:
        raise RenderProblem(f"memory quantity {quantity!r}")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2) or ""])


def service_aliases(objects: list[Obj], pod_labels: Mapping[str, str], namespace: str
                    ) -> list[str]:
    names: list[str] = []
    for service in objects:
        if service.get("kind") != "Service":
            continue
        selector = (service.get("spec") or {}).get("selector") or {}
        if selector and all(pod_labels.get(k) == v for k, v in selector.items()):
            name = service["metadata"]["name"]
            names += [name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
                      f"{name}.{namespace}.svc.cluster.local"]
    return names


def specs(objects: list[Obj], namespace: str) -> list[Spec]:
    """Every workload's main (first) container; one pod of each (…-0)."""
    secrets, configmaps = secret_data(objects), configmap_data(objects)
    out: list[Spec] = []
    for workload in objects:
        if workload.get("kind") not in WORKLOADS:
            continue
        template = workload["spec"]["template"]
        pod_spec = template["spec"]
        pod_labels = labels(template)
        pod = f"{workload['metadata']['name']}-0"
        container = pod_spec["containers"][0]
        ports = {p.get("name") or str(p["containerPort"]): int(p["containerPort"])
                 for p in container.get("ports") or []}
        env, from_secrets = resolve_env(container, pod, namespace, pod_spec, secrets,
                                        configmaps)
        info = image_info(container["image"])
        command = ([expand(str(c), env) for c in container["command"]]
                   if "command" in container else None)
        args = [expand(str(a), env) for a in container["args"]] if "args" in container else None
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            kinds = [k for k in volume if k != "name"] or ["volumeClaimTemplate"]
            mounts.append(Mount(mount["name"], mount["mountPath"], kinds[0],
                                bool(mount.get("readOnly"))))
        security = dict(pod_spec.get("securityContext") or {})
        security.update(container.get("securityContext") or {})
        out.append(Spec(
            component=pod_labels.get(COMPONENT, workload["metadata"]["name"]),
            workload=workload["metadata"]["name"], pod=pod, container=container["name"],
            image=container["image"], command=command, args=args,
            argv=runtime_argv(command, args, info), env=env, secret_env=from_secrets,
            ports=ports, readiness=probe(container.get("readinessProbe"), ports),
            startup=probe(container.get("startupProbe"), ports),
            grace_s=int(pod_spec.get("terminationGracePeriodSeconds", 30)),
            prestop_s=prestop_seconds(container), mounts=mounts, security=security,
            memory_limit=memory_bytes(((container.get("resources") or {}).get("limits")
                                       or {}).get("memory")),
            aliases=service_aliases(objects, pod_labels, namespace), image_info=info))
    return out


def rewrite_hosts(value: str, names: list[str], to: str = LOOPBACK) -> str:
    """Host names (as URL hosts: after //, @ or a comma; before :, /, a comma or the end)
    replaced by ``to``; the longest names first so a.b.svc is not cut to a.b."""
    for name in sorted(set(names), key=len, reverse=True):
        value = re.sub(rf"(?<=[/@,])({re.escape(name)})(?=[:/,]|$)", to, value)
        if value == name:
            value = to
    return value


# --- Docker ------------------------------------------------------------------------------


def docker_options(spec: Spec) -> list[str]:
    """`docker run` options that reproduce the pod's security context and limits."""
    sec = spec.security
    opts: list[str] = []
    if "runAsUser" in sec:
        opts += ["--user", f"{sec['runAsUser']}:{sec.get('runAsGroup', sec['runAsUser'])}"]
    if sec.get("readOnlyRootFilesystem"):
        opts.append("--read-only")
    if "ALL" in ((sec.get("capabilities") or {}).get("drop") or []):
        opts += ["--cap-drop", "ALL"]
    for cap in (sec.get("capabilities") or {}).get("add") or []:
        opts += ["--cap-add", cap]
    if sec.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    for mount in spec.mounts:
        if mount.kind == "emptyDir":
            opts += ["--tmpfs", f"{mount.path}:rw,exec,mode=1777"]
        else:
            raise RenderProblem(f"{spec.workload}: volume {mount.name} ({mount.kind}) has no "
                                "Docker equivalent here")
    if spec.memory_limit:
        opts += ["--memory", str(spec.memory_limit)]
    return opts


def docker_plan(objects: list[Obj], namespace: str, out: Path, cascade_tag: str | None,
                redis_image: str | None) -> list[str]:
    """One shell line per container (components' order: Redis and the stages before the
    orchestrator), each field shell-quoted; its environment in OUT/NAME.env (mode 600)."""
    lines = []
    order = {"redis": 0, "asr": 1, "tts": 1, "llm": 1, "orchestrator": 2}
    for spec in sorted(specs(objects, namespace), key=lambda s: order.get(s.component, 1)):
        image = spec.image
        if cascade_tag and dockerfile_for(image) is not None:
            image = f"{image.split('@')[0].rsplit(':', 1)[0]}:{cascade_tag}"
        if redis_image and spec.component == "redis":
            image = redis_image
        env_file = out / f"{spec.component}.env"
        env_file.touch(mode=0o600)
        for key, value in spec.env.items():
            if "\n" in value:
                raise RenderProblem(f"{key}: a multi-line value cannot go in an env file")
        env_file.write_text("".join(f"{k}={v}\n" for k, v in spec.env.items()))
        fields = {
            "component": spec.component, "image": image, "env_file": str(env_file),
            "grace": str(spec.grace_s), "prestop": str(spec.prestop_s),
            "aliases": " ".join(spec.aliases),
            "probe_kind": spec.readiness.kind if spec.readiness else "",
            "probe_port": str(spec.port_of(spec.readiness) or ""),
            "probe_path": spec.readiness.path if spec.readiness else "",
            "probe_command": shlex.join(spec.readiness.command) if spec.readiness else "",
            "probe_describe": spec.readiness.describe() if spec.readiness else "-",
            "options": shlex.join(docker_options(spec)),
            "entrypoint": spec.command[0] if spec.command else "",
            "argv": shlex.join((spec.command or [])[1:] + (spec.args or [])
                               if spec.command else (spec.args or [])),
            "port": str(next(iter(spec.ports.values()), "")),
        }
        lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in fields.items()))
    return lines


def redact(text: str, spec: Spec) -> str:
    for key in spec.secret_env:
        if spec.env.get(key):
            text = text.replace(spec.env[key], "<secret>")
    return text


def describe(spec: Spec) -> Iterator[str]:
    yield (f"{spec.component}: {spec.image}  argv {redact(shlex.join(spec.argv), spec)}  "
           f"ready {spec.readiness.describe() if spec.readiness else '-'}  "
           f"grace {spec.grace_s} s (preStop {spec.prestop_s} s)")
    for key, value in spec.env.items():
        yield f"    {key}={'<secret>' if key in spec.secret_env else value}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print each container as the kubelet would run it")
    show.add_argument("render", type=Path)
    show.add_argument("--namespace", required=True)
    plan = sub.add_parser("docker-plan", help="shell-quoted lines for run-rendered.sh")
    plan.add_argument("render", type=Path)
    plan.add_argument("--namespace", required=True)
    plan.add_argument("--out", type=Path, required=True, help="folder for the env files")
    plan.add_argument("--cascade-tag", help="run cascade-* images with this tag instead")
    plan.add_argument("--redis-image", help="run Redis from this image instead")
    args = parser.parse_args(argv)
    objects = load(args.render.read_text())
    try:
        if args.command == "show":
            for spec in specs(objects, args.namespace):
                print("\n".join(describe(spec)))
        else:
            print("\n".join(docker_plan(objects, args.namespace, args.out, args.cascade_tag,
                                        args.redis_image)))
    except RenderProblem as problem:
        print(f"rendered.py: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
