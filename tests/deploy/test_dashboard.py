"""The Grafana dashboard (deploy/helm/cascade/files/grafana-dashboard.json) reads only
metrics the code declares.

Every PromQL expression (panel targets and template variable queries) is parsed for the
metric names it selects, and each must be a series name the Prometheus registry exposes
once ``orchestrator.metrics`` and ``stages.common.metrics`` are imported: a gauge by its
name, a counter as ``<name>_total``, a histogram as ``_bucket``/``_sum``/``_count``. A
renamed metric fails here instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

import orchestrator.metrics
import stages.common.metrics

DASHBOARD = (Path(__file__).resolve().parents[2] / "deploy" / "helm" / "cascade" / "files"
             / "grafana-dashboard.json")
DS = "${DS_PROMETHEUS}"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_NAME = re.compile(r"(?<![\w$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, label names,
    grouping labels, strings, ranges and ``$variables`` left out)."""
    values = _LABEL_VALUES.match(expr)
    if values:  # Grafana's label_values(selector, label): only the selector names metrics
        expr = values.group(1)
    expr = _STRING.sub('""', expr)
    expr = _RANGE.sub("", expr)
    expr = _GROUPING.sub("", expr)
    expr = _MATCHERS.sub("", expr)
    return {m.group(1) for m in _NAME.finditer(expr)
            if not m.group(2) and m.group(1).lower() not in KEYWORDS}


def exposed_names() -> set[str]:
    """Series names of cascade's metrics in the default registry."""
    assert orchestrator.metrics.ACTIVE_SESSIONS and stages.common.metrics.STAGE_LOAD
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("cascade_"):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row's


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_the_parser_finds_metric_names_and_only_them() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le, pipeline) (rate('
                        'cascade_turn_first_audio_seconds_bucket{namespace=~"$namespace", '
                        'job=~"$job"}[$__rate_interval])))') == {
        "cascade_turn_first_audio_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / (sum(rate(a_total[5m])) + "
                        "sum(rate(b_total{x=\"y\"}[5m]))) * 60") == {"a_total", "b_total"}
    assert metric_names('label_values({__name__=~"cascade_.+", namespace=~"$n"}, job)') == set()
    assert metric_names("label_values(up{job=\"x\"}, pod)") == {"up"}
    assert metric_names("max by (stage, pod) (cascade_stage_load)") == {"cascade_stage_load"}


def test_every_expression_reads_metrics_the_code_declares(dashboard: dict[str, Any]) -> None:
    declared = exposed_names()
    assert "cascade_turn_first_audio_seconds_bucket" in declared
    assert "cascade_barge_ins_total" in declared and "cascade_stage_load" in declared
    used: set[str] = set()
    for expr in expressions(dashboard):
        names = metric_names(expr)
        unknown = names - declared
        assert not unknown, f"{sorted(unknown)} in {expr!r} are not declared metrics"
        used |= names
    assert len(used) >= 30, sorted(used)


def test_the_panels_the_operators_need_are_there(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for e in expressions(dashboard)))
    wanted = {
        "cascade_active_sessions", "cascade_webrtc_calls",
        *(f"cascade_turn_{m}_seconds_bucket" for m in (
            "endpoint_delay", "first_transcript_delta", "final_transcript",
            "llm_first_token", "reply_started", "first_audio")),
        "cascade_speculative_hits_total", "cascade_speculative_misses_total",
        "cascade_barge_ins_total", "cascade_error_events_total",
        "cascade_rejected_connections_total", "cascade_stage_load",
        "cascade_stage_active_streams", "cascade_stage_queued", "cascade_stage_busy_ratio",
        "cascade_replica_up", "cascade_replica_failovers_total"}
    assert wanted <= used, sorted(wanted - used)
    voice = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])
             if "cascade_turn_first_audio_seconds_bucket" in t["expr"]]
    for q in ("0.5", "0.9", "0.99"):  # voice-to-voice p50/p90/p99 from the buckets
        assert any(e.startswith(f"histogram_quantile({q},") for e in voice), q


def test_datasource_and_variables(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"]["uid"] == DS, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS
            # Every selector is scoped by the namespace and job variables.
            for matchers in _MATCHERS.findall(_STRING.sub(
                    lambda m: m.group(0).replace("{", "(").replace("}", ")"),
                    target["expr"])):
                assert 'namespace=~"$namespace"' in matchers, target["expr"]
                assert 'job=~"$job"' in matchers, target["expr"]
