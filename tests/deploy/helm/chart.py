"""The Helm chart rendered with the real helm binary, and a small model of the render.

helm comes from deploy/helm/tools.sh (``~/.cache/cascade-helm/bin/helm``, or
``$CASCADE_HELM_BIN``, ``.venv/bin/helm``, PATH). Without it the tests skip, unless
``CASCADE_REQUIRE_HELM`` is set (CI sets it): then they fail.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
# $CASCADE_HELM_CHART: check another copy of the chart (e.g. a deliberately broken one).
CHART = Path(os.environ.get("CASCADE_HELM_CHART", ROOT / "deploy" / "helm" / "cascade"))
RELEASE = "cascade"
NAMESPACE = "voice"
# Helm's longest release name: every derived name must still fit its limit.
LONG_RELEASE = "r" * 53
KUBE_VERSION = "1.33.0"
# The CRDs (Prometheus Operator, KEDA) present, as on a cluster that runs them.
API_VERSIONS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
COMPONENT_LABEL = "app.kubernetes.io/component"

Obj = dict[str, Any]
# libyaml's parser where PyYAML has it (several times faster on these renders).
LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RenderError(RuntimeError):
    """helm template failed (not an AssertionError: a check must not pass or fail on it)."""


def values_names() -> list[str]:
    """"default" (the chart's values.yaml alone) and every ci/NAME-values.yaml."""
    files = (CHART / "ci").glob("*-values.yaml")
    return ["default", *sorted(p.name.removesuffix("-values.yaml") for p in files)]


def values_path(name: str) -> Path | None:
    return None if name == "default" else CHART / "ci" / f"{name}-values.yaml"


def find_helm() -> Path | None:
    candidates = []
    if os.environ.get("CASCADE_HELM_BIN"):
        candidates.append(Path(os.environ["CASCADE_HELM_BIN"]) / "helm")
    cache = Path(os.environ.get("CASCADE_HELM_CACHE", Path.home() / ".cache/cascade-helm"))
    candidates += [cache / "bin" / "helm", ROOT / ".venv" / "bin" / "helm"]
    on_path = shutil.which("helm")
    if on_path:
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.exists()), None)


def require_helm() -> Path:
    helm = find_helm()
    if helm is None:
        reason = "no helm binary: run `bash deploy/helm/tools.sh`"
        if os.environ.get("CASCADE_REQUIRE_HELM"):
            pytest.fail(f"{reason} (CASCADE_REQUIRE_HELM is set)")
        pytest.skip(reason)
    if not CHART.joinpath("Chart.yaml").exists():
        pytest.fail(f"no chart at {CHART}")
    return helm


def deep_merge(base: Any, over: Any) -> Any:
    """Helm's values coalescing: maps merge key by key, anything else replaces, null
    deletes the key."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return over
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = deep_merge(out.get(key), value)
    return out


@functools.cache
def _values_file(path: Path) -> Obj:
    loaded = yaml.load(path.read_text(), Loader=LOADER)
    return loaded if isinstance(loaded, dict) else {}


def effective_values(name: str, overrides: Mapping[str, Any] | None = None) -> Obj:
    values = _values_file(CHART / "values.yaml")
    path = values_path(name)
    if path is not None:
        values = deep_merge(values, _values_file(path))
    if overrides:
        values = deep_merge(values, dict(overrides))
    return copy.deepcopy(values)


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False,
                          timeout=60)


@functools.cache
def _template(helm: Path, chart: Path, name: str, release: str, kube: str,
              extra: tuple[str, ...]) -> tuple[Obj, ...]:
    path = values_path(name)
    args = ["template", release, str(chart), "-n", NAMESPACE, "--kube-version", kube]
    for api in API_VERSIONS:
        args += ["--api-versions", api]
    if path is not None:
        args += ["-f", str(path)]
    args += list(extra)
    out = run_helm(helm, *args)
    if out.returncode != 0:
        raise RenderError(f"helm template {name} failed:\n{out.stderr}")
    return tuple(d for d in yaml.load_all(out.stdout, Loader=LOADER) if d)


@dataclass
class Render:
    """One ``helm template`` output: its objects and the values that made it."""

    name: str
    release: str
    values: Obj
    objects: list[Obj]

    def of(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of(kind) if o["metadata"]["name"] == name), None)

    def workloads(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def pods(self) -> Iterator[tuple[Obj, Obj]]:
        """(workload, its pod template) for every workload."""
        for workload in self.workloads():
            yield workload, workload["spec"]["template"]

    def component(self, component: str) -> Obj | None:
        """The workload of one component (orchestrator, asr, tts, llm, redis), if rendered."""
        found = [w for w in self.workloads() if labels(w["spec"]["template"]).get(
            COMPONENT_LABEL) == component]
        assert len(found) <= 1, f"{len(found)} workloads for component {component}"
        return found[0] if found else None

    def services_selecting(self, pod_labels: Mapping[str, str]) -> list[Obj]:
        return [s for s in self.of("Service")
                if s["spec"].get("selector") and all(
                    pod_labels.get(k) == v for k, v in s["spec"]["selector"].items())]


def labels(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def containers(pod_template: Obj, init: bool = True) -> list[Obj]:
    spec = pod_template["spec"]
    out = list(spec.get("containers") or [])
    if init:
        out += list(spec.get("initContainers") or [])
    return out


def render(name: str, *, release: str = RELEASE, kube: str = KUBE_VERSION,
           overrides: Mapping[str, Any] | None = None, set_args: tuple[str, ...] = ()
           ) -> Render:
    """``helm template`` of values file ``name`` (plus ``--set`` args); ``overrides``
    are only the matching effective values of those args, for the tests' expectations."""
    objects = _template(require_helm(), CHART, name, release, kube, set_args)
    return Render(name, release, effective_values(name, overrides), list(objects))
