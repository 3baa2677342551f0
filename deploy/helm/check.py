"""Every static check of the Helm chart, without a cluster (run it with deploy/helm/check.sh).

For the default values and each ``ci/*-values.yaml`` of the chart:

1. ``helm lint --strict`` (values.schema.json enforced);
2. ``helm template`` for each Kubernetes version in KUBE_VERSIONS, with the CRD API
   versions the chart may render (Prometheus Operator, KEDA) announced as capabilities;
   each render is checked for duplicate keys (yamllint's rule: a template that writes a key
   twice renders YAML that parsers silently collapse) and validated resource by resource
   with kubernetes-validate, strict, against that Kubernetes version. Kinds without a
   schema are CRDs (ServiceMonitor, ScaledObject): tests/deploy/helm/ checks those;
   any other kind without a schema fails;
3. the values files under tests/deploy/helm/bad/ must be rejected by ``helm lint`` and
   ``helm template`` with a message matching each ``# expect: REGEX`` line of the file
   (the schema must name the field);
4. checkov over every render (Kubernetes framework) and over the chart itself (Helm
   framework), failures compared with the reviewed skip list in checkov-skips.yaml: a
   failure not on the list fails, and so does a skip that no longer matches anything.

Also yamllint over the chart's values files and shellcheck over deploy/helm/*.sh.
Prints a table (values file x check) and exits 1 on any failure. Runs in the tools venv
of tools.sh (kubernetes-validate, yamllint and PyYAML there); helm and checkov from
$CASCADE_HELM_BIN.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Resource
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cascade"
BAD = ROOT / "tests" / "deploy" / "helm" / "bad"
SKIPS = ROOT / "deploy" / "helm" / "checkov-skips.yaml"
KUBE_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")
# The CRDs the chart can render; announced as present, as on a cluster that has them.
API_VERSIONS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject",
             "TriggerAuthentication"}
RELEASE = "cascade"
NAMESPACE = "cascade"
# The chart's own YAML (values files): yamllint's defaults, lines up to 120.
VALUES_LINT = YamlLintConfig(
    "extends: default\n"
    "rules: {line-length: {max: 120}, document-start: disable,"
    " comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}")



@functools.cache
def _schema(path: str, kube: str) -> Any:
    return kv_utils.schema_contents(path, kube)


@functools.cache
def _validator(kube: str, kind: str, api_version: str) -> jsonschema.Validator:
    """kubernetes_validate.validate(strict=True)'s validator, built once per kind and
    version: it builds a new one (and re-reads the 1.4 MB definitions) for every resource,
    ~45 ms each, and a run here validates ~1000 resources."""
    version = [v for v in kv_utils.all_versions()
               if kv_utils.major_minor(v) <= kv_utils.major_minor(kube)][-1]
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = _schema(f"{schema_dir}/{kind.lower()}-{group_version}.json", kube)
    except FileNotFoundError:
        raise kubernetes_validate.SchemaNotFoundError(
            version=kv_utils.major_minor(kube), kind=kind, api_version=api_version) from None
    definitions = _schema(f"{schema_dir}/_definitions.json", kube)
    registry: referencing.Registry[Any] = referencing.Registry()
    registry = Resource.from_contents(schema) @ registry
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_strict(doc: dict[str, Any], kube: str) -> list[str]:
    """kubernetes-validate --strict -k KUBE on one resource: its errors (none: valid)."""
    validator = _validator(kube, doc["kind"], doc["apiVersion"])
    return [f"{'.'.join(str(p) for p in err.path)}: {err.message}"
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))]


@dataclass
class Report:
    """Tables of pass/FAIL cells, one per section, and the failures' details."""

    sections: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def cell(self, section: str, row: str, column: str, ok: bool, detail: str = "") -> None:
        self.note(section, row, column, "pass" if ok else "FAIL")
        if not ok:
            self.failures.append(f"[{row} / {column}] {detail}".rstrip())

    def note(self, section: str, row: str, column: str, text: str) -> None:
        self.sections.setdefault(section, {}).setdefault(row, {})[column] = text

    def tables(self) -> str:
        out = []
        for section, rows in self.sections.items():
            columns: list[str] = []
            for cells in rows.values():
                columns += [c for c in cells if c not in columns]
            width = max(len(section), *(len(r) for r in rows))
            widths = [max(len(c), *(len(cells.get(c, "-")) for cells in rows.values()))
                      for c in columns]
            out.append("  ".join([f"{section:<{width}}", *(
                f"{c:<{w}}" for c, w in zip(columns, widths, strict=True))]).rstrip())
            for row, cells in rows.items():
                out.append("  ".join([f"{row:<{width}}", *(
                    f"{cells.get(c, '-'):<{w}}" for c, w in zip(columns, widths, strict=True))
                ]).rstrip())
            out.append("")
        return "\n".join(out)


def run(cmd: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          **kw)


def values_files() -> list[tuple[str, Path | None]]:
    files = sorted((CHART / "ci").glob("*-values.yaml"))
    return [("default", None)] + [(f.name.removesuffix("-values.yaml"), f) for f in files]


def helm_args(values: Path | None) -> list[str]:
    return [] if values is None else ["-f", str(values)]


def template_cmd(helm: Path, values: Path | None, kube: str) -> list[str]:
    cmd = [str(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE,
           "--kube-version", kube, *helm_args(values)]
    for api in API_VERSIONS:
        cmd += ["--api-versions", api]
    return cmd


def lint_values(report: Report) -> None:
    for path in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]:
        problems = [p for p in linter.run(path.read_text(), VALUES_LINT, str(path))
                    if p.level == "error"]
        report.cell("yamllint", path.name if path.parent == CHART else f"ci/{path.name}",
                    "yamllint", not problems,
                    "; ".join(f"{path.name}:{p.line}:{p.column} {p.message} ({p.rule})"
                              for p in problems))


def shellcheck(bin_dir: Path, report: Report) -> None:
    for script in sorted((ROOT / "deploy" / "helm").glob("*.sh")):
        out = run([bin_dir / "shellcheck", "-x", script], cwd=ROOT)
        report.cell("scripts", f"deploy/helm/{script.name}", "shellcheck", out.returncode == 0,
                    out.stdout.strip())


def helm_lint(helm: Path, report: Report) -> None:
    for name, values in values_files():
        out = run([helm, "lint", "--strict", CHART, "-n", NAMESPACE, *helm_args(values)])
        report.cell("values", name, "lint", out.returncode == 0,
                    (out.stdout + out.stderr).strip())


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_Loader):  # type: ignore[valid-type,misc,unused-ignore]
    """A YAML loader that refuses a mapping with a key twice (yamllint's key-duplicates
    rule, at libyaml's speed): PyYAML and the API server keep the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def validate_render(text: str, kube: str) -> tuple[list[str], set[str]]:
    """Problems of one render against one Kubernetes version, and the CRD kinds seen."""
    problems: list[str] = []
    crds: set[str] = set()
    try:
        docs = [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d]
    except yaml.YAMLError as err:
        return [f"not valid YAML: {err}"], crds
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name')}"
        try:
            problems += [f"{name}: {error}" for error in validate_strict(doc, kube)]
        except kubernetes_validate.SchemaNotFoundError:
            if doc["kind"] in CRD_KINDS:
                crds.add(doc["kind"])
            else:
                problems.append(f"{name}: no schema for {doc['apiVersion']} in Kubernetes "
                                f"{kube} (removed or misspelled API version?)")
    if not docs:
        problems.append("the render is empty")
    return problems, crds


# What the validator must reject, so a broken validator cannot pass everything.
CANARY = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "canary"},
          "spec": {"ports": [{"port": "eighty", "bogus": 1}]}}


def render_matrix(helm: Path, report: Report, out_dir: Path) -> None:
    for kube in KUBE_VERSIONS:
        errors = validate_strict(CANARY, kube)
        report.cell("values", "(validator canary)", kube, len(errors) == 2,
                    f"the strict validator missed a wrong type or an unknown field: {errors}")
    dup, _ = validate_render("kind: ConfigMap\nkind: Secret\n", KUBE_VERSIONS[0])
    report.cell("values", "(validator canary)", "lint", bool(dup), "a duplicate key passed")
    for name, values in values_files():
        all_crds: set[str] = set()
        for kube in KUBE_VERSIONS:
            out = run(template_cmd(helm, values, kube))
            if out.returncode != 0:
                report.cell("values", name, kube, False, out.stderr.strip())
                continue
            (out_dir / f"{name}-{kube}.yaml").write_text(out.stdout)
            problems, crds = validate_render(out.stdout, kube)
            all_crds |= crds
            report.cell("values", name, kube, not problems, "\n    ".join(problems))
        report.note("values", name, "CRDs (checked by pytest)", ",".join(sorted(all_crds)) or "-")


def expectations(path: Path) -> list[re.Pattern[str]]:
    found = [re.compile(m.group(1).strip())
             for m in re.finditer(r"^#\s*expect:\s*(.+)$", path.read_text(), re.MULTILINE)]
    if not found:
        raise SystemExit(f"{path}: no '# expect: REGEX' line")
    return found


def negative(helm: Path, report: Report) -> None:
    for path in sorted(BAD.glob("*.yaml")):
        wanted = expectations(path)
        row = f"bad/{path.name}"
        runs: list[tuple[str, list[str]]] = [
            ("lint rejects", [str(helm), "lint", "--strict", str(CHART), "-f", str(path)]),
            ("template rejects", template_cmd(helm, path, "1.33.0"))]
        for column, cmd in runs:
            out = run(cmd)
            text = out.stdout + out.stderr
            missing = [w.pattern for w in wanted if not w.search(text)]
            if out.returncode == 0:
                report.cell("bad values", row, column, False, "accepted; it must be rejected")
            else:
                report.cell("bad values", row, column, not missing,
                            f"rejected, but the message does not match {missing}:\n"
                            f"    {text.strip()[:600]}")


@dataclass
class Skip:
    check: str
    reason: str
    resources: list[str]  # fnmatch patterns of checkov resource ids; empty: every resource
    used: bool = False

    def covers(self, check: str, resource: str) -> bool:
        return check == self.check and (
            not self.resources or any(fnmatch.fnmatchcase(resource, r) for r in self.resources))


def load_skips() -> list[Skip]:
    data = yaml.safe_load(SKIPS.read_text()) or {}
    skips = []
    for entry in data.get("skips") or []:
        reason = str(entry.get("reason") or "").strip()
        if not reason:
            raise SystemExit(f"{SKIPS}: {entry.get('check')} has no reason")
        skips.append(Skip(entry["check"], reason, list(entry.get("resources") or [])))
    return skips


def checkov(checkov_bin: Path, helm: Path, report: Report, out_dir: Path) -> None:
    skips = load_skips()
    kube_dir = out_dir / "checkov-kubernetes"
    kube_dir.mkdir()
    for name, _ in values_files():
        rendered = out_dir / f"{name}-1.33.0.yaml"
        if rendered.exists():  # one that failed to render is a failure already
            shutil.copy(rendered, kube_dir / f"{name}.yaml")
    env = {**os.environ, "PATH": f"{helm.parent}:{os.environ.get('PATH', '')}"}
    runs = {"checkov": [checkov_bin, "-d", kube_dir, "--framework", "kubernetes"],
            "checkov helm": [checkov_bin, "-d", CHART, "--framework", "helm"]}
    # Both at once: each spends ~10 s just starting.
    procs = {column: subprocess.Popen(
        [str(c) for c in [*cmd, "--skip-download", "--quiet", "--compact", "-o", "json"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for column, cmd in runs.items()}
    for column, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        try:
            data = json.loads(stdout)
        except json.JSONDecodeError:
            report.cell("checkov", column, "result", False,
                        f"no JSON from checkov:\n{stderr[-2000:]}")
            continue
        results = data if isinstance(data, list) else [data]
        if not any("results" in r for r in results):
            report.cell("checkov", column, "result", False,
                        f"checkov checked nothing:\n{stdout[-500:]}{stderr[-2000:]}")
            continue
        passed = reviewed = 0
        unreviewed: list[str] = []
        for result in results:
            failed_checks = (result.get("results") or {}).get("failed_checks") or []
            passed += int((result.get("summary") or {}).get("passed") or 0)
            for check in failed_checks:
                resource = str(check.get("resource"))
                hit = [s for s in skips if s.covers(check["check_id"], resource)]
                for s in hit:
                    s.used = True
                if hit:
                    reviewed += 1
                else:
                    where = Path(str(check.get("file_path", "?"))).name
                    unreviewed.append(f"{check['check_id']} {resource} ({where}): "
                                      f"{check.get('check_name')}")
        report.cell("checkov", column, "result", not unreviewed,
                    f"{len(unreviewed)} findings not in {SKIPS.name}:\n    "
                    + "\n    ".join(sorted(set(unreviewed))))
        report.note("checkov", column, "passed", str(passed))
        report.note("checkov", column, "reviewed skips", str(reviewed))
        report.note("checkov", column, "unreviewed", str(len(unreviewed)))
    unused = [s.check for s in skips if not s.used]
    report.cell("checkov", "skip list", "result", not unused,
                f"skips in {SKIPS.name} that match no finding any more (remove them): {unused}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-checkov", action="store_true", help="skip checkov (slow start)")
    parser.add_argument("--keep", type=Path, help="write the renders to this folder")
    args = parser.parse_args(argv)
    bin_dir = Path(os.environ.get("CASCADE_HELM_BIN", Path.home() / ".cache/cascade-helm/bin"))
    helm = bin_dir / "helm"
    if not helm.exists():
        print(f"check: no helm in {bin_dir}: run deploy/helm/tools.sh", file=sys.stderr)
        return 2
    start = time.monotonic()
    report = Report()
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        steps: list[tuple[str, Any]] = [
            ("yamllint", lambda: lint_values(report)),
            ("shellcheck", lambda: shellcheck(bin_dir, report)),
            ("helm lint", lambda: helm_lint(helm, report)),
            ("render + validate", lambda: render_matrix(helm, report, out_dir)),
            ("bad values", lambda: negative(helm, report)),
        ]
        if not args.no_checkov:
            steps.append(("checkov", lambda: checkov(bin_dir / "checkov", helm, report,
                                                      out_dir)))
        for label, step in steps:
            t0 = time.monotonic()
            step()
            timings.append(f"{label} {time.monotonic() - t0:.1f} s")
    print(report.tables())
    print(f"times: {', '.join(timings)}; total {time.monotonic() - start:.1f} s")
    if report.failures:
        print(f"\n{len(report.failures)} FAILED:")
        for failure in report.failures:
            print(f"  {failure}")
        return 1
    print("helm checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
