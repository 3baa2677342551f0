"""The render checks fail on a broken chart: each case breaks one thing in a copy of the
chart (a template edit or a values file) and runs the check that must catch it.

A check that passes on the real chart proves little unless it fails on a chart with that
very bug. A template anchor that no longer exists fails loudly: update the case with the
chart.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helm import (
    chart,
    test_names,
    test_network_policy,
    test_scaling,
    test_security,
    test_wiring,
)


@dataclass
class Mutation:
    id: str
    check: Callable[..., None]
    # A template edit: (file under templates/, text that must be there, replacement).
    edit: tuple[str, str, str] | None = None
    # Or values that break it (written as ci/mutant-values.yaml).
    values: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


MUTATIONS = [
    Mutation("stage Service not headless", test_wiring.test_orchestrator_reaches_each_stage,
             edit=("stage-service.yaml", "  clusterIP: None\n", "")),
    Mutation("stage Service selects another stage",
             test_wiring.test_orchestrator_reaches_each_stage,
             edit=("stage-service.yaml",
                   'selector:\n    {{- include "cascade.selectorLabels" (dict "root" $ '
                   '"component" $component)',
                   'selector:\n    {{- include "cascade.selectorLabels" (dict "root" $ '
                   '"component" "tts")')),
    Mutation("Service targetPort names no container port",
             test_wiring.test_services_select_pods_and_target_real_ports,
             edit=("stage-service.yaml", "targetPort: http", "targetPort: web")),
    Mutation("probe on a port the container lacks",
             test_wiring.test_probes_use_real_container_ports,
             edit=("_helpers.tpl", "    port: http\n", "    port: metrics\n")),
    Mutation("readiness on /healthz", test_wiring.test_every_deployed_component_serves_readiness,
             edit=("stage-deployment.yaml", '"readiness" "/readyz"', '"readiness" "/healthz"')),
    Mutation("stage told to listen on another port",
             test_wiring.test_servers_listen_where_the_pod_says,
             edit=("stage-deployment.yaml",
                   "- name: {{ $prefix }}PORT\n              value: {{ $v.port | quote }}",
                   '- name: {{ $prefix }}PORT\n              value: "9999"')),
    Mutation("orchestrator asks for a model the LLM does not serve",
             test_wiring.test_servers_listen_where_the_pod_says,
             edit=("orchestrator-deployment.yaml",
                   "- name: CASCADE_LLM_MODEL\n              value: {{ . | quote }}",
                   '- name: CASCADE_LLM_MODEL\n              value: "another-model"')),
    Mutation("Secret key renamed", test_wiring.test_referenced_configmaps_secrets_and_claims_exist,
             edit=("orchestrator-secret.yaml", '"api-key" (include', '"apikey" (include')),
    Mutation("names not truncated", test_names.test_names_and_labels_are_valid,
             edit=("_helpers.tpl", '(include "cascade.fullname" .root | trunc $keep',
                   '(include "cascade.fullname" .root'),
             kwargs={"release": chart.LONG_RELEASE}),
    Mutation("stage ingress from anywhere",
             test_network_policy.test_nothing_else_reaches_stages_or_redis,
             edit=("networkpolicy.yaml", "policyTypes: [Ingress]\n  ingress:\n",
                   "policyTypes: [Ingress]\n  ingress:\n    - {}\n")),
    Mutation("orchestrator egress anywhere", test_network_policy.test_orchestrator_egress,
             edit=("networkpolicy.yaml", "  egress:\n", "  egress:\n    - {}\n")),
    Mutation("grace period without the preStop and margin",
             test_scaling.test_grace_period_covers_prestop_and_drain,
             edit=("_helpers.tpl",
                   "add (int $s.preStopSleepSeconds) (int (ceil .drain)) "
                   "(int $s.graceMarginSeconds)", "int (ceil .drain)"),
             kwargs={"kube": "1.33.0"}),
    Mutation("preStop sleep action on 1.29",
             test_scaling.test_grace_period_covers_prestop_and_drain,
             edit=("_helpers.tpl", '">=1.30-0"', '">=1.28-0"'), kwargs={"kube": "1.29.0"}),
    Mutation("HPA for components that did not ask",
             test_scaling.test_autoscalers_for_exactly_the_enabled_components,
             edit=("hpa.yaml", "{{- if $a.enabled }}", "{{- if true }}")),
    Mutation("cascade containers may run as root",
             test_security.test_cascade_containers_run_as_non_root,
             values={"podSecurityContext": {"runAsNonRoot": False},
                     "containerSecurityContext": {"runAsNonRoot": False}}),
    Mutation("GPU on the orchestrator", test_security.test_gpus_only_where_the_values_ask,
             values={"orchestrator": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}),
    Mutation("a key as a literal", test_security.test_credentials_come_from_secrets,
             values={"orchestrator": {"extraEnv": [
                 {"name": "CASCADE_LLM_API_KEY", "value": "sk-inline-0123456789"}]}}),
    Mutation("credentials in a URL", test_security.test_credentials_come_from_secrets,
             values={"asr": {"enabled": False,
                             "external": {"url": "http://user:pw@asr.speech.svc:8001"}}}),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_check_fails_on_broken_chart(mutation: Mutation, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    chart.require_helm()
    copy = tmp_path / "cascade"
    shutil.copytree(chart.CHART, copy)
    values = "default"
    if mutation.edit is not None:
        name, old, new = mutation.edit
        path = copy / "templates" / name
        text = path.read_text()
        assert old in text, f"the chart changed: {name} no longer has {old!r}; update this case"
        path.write_text(text.replace(old, new))
    if mutation.values is not None:
        (copy / "ci" / "mutant-values.yaml").write_text(yaml.safe_dump(mutation.values))
        values = "mutant"
    monkeypatch.setattr(chart, "CHART", copy)
    with pytest.raises(AssertionError):
        mutation.check(values=values, **mutation.kwargs)
