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

import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
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
DUPLICATE_KEYS = YamlLintConfig("rules: {key-duplicates: enable}")
# The chart's own YAML (values files): yamllint's defaults, lines up to 120.
VALUES_LINT = YamlLintConfig(
    "extends: default\n"
    "rules: {line-length: {max: 120}, document-start: disable,"
    " comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}")

# The schema files are the same for every resource; kubernetes-validate reads them anew
# each time (hundreds of resources here), so remember them.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


@dataclass
class Report:
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def cell(self, row: str, column: str, ok: bool, detail: str = "") -> None:
        self.rows.setdefault(row, {})[column] = "pass" if ok else "FAIL"
        if not ok:
            self.failures.append(f"[{row} / {column}] {detail}".rstrip())

    def note(self, row: str, column: str, text: str) -> None:
        self.rows.setdefault(row, {})[column] = text

    def table(self, columns: Sequence[str]) -> str:
        width = max(len(r) for r in self.rows) if self.rows else 10
        widths = [max(len(c), 4) for c in columns]
        lines = ["  ".join([f"{'values':<{width}}",
                            *(f"{c:<{w}}" for c, w in zip(columns, widths, strict=True))])]
        for row, cells in self.rows.items():
            lines.append("  ".join([f"{row:<{width}}", *(
                f"{cells.get(c, '-'):<{w}}" for c, w in zip(columns, widths, strict=True))]))
        return "\n".join(lines)


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
        report.cell(path.name if path.parent == CHART else f"ci/{path.name}", "yamllint",
                    not problems,
                    "; ".join(f"{path.name}:{p.line}:{p.column} {p.message} ({p.rule})"
                              for p in problems))


def helm_lint(helm: Path, report: Report) -> None:
    for name, values in values_files():
        out = run([helm, "lint", "--strict", CHART, "-n", NAMESPACE, *helm_args(values)])
        report.cell(name, "lint", out.returncode == 0, (out.stdout + out.stderr).strip())


def validate_render(text: str, kube: str) -> tuple[list[str], set[str]]:
    """Problems of one render against one Kubernetes version, and the CRD kinds seen."""
    problems = [f"line {p.line}: {p.message}"
                for p in linter.run(text, DUPLICATE_KEYS) if p.level == "error"]
    crds: set[str] = set()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            problems.append(f"{name}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if doc["kind"] in CRD_KINDS:
                crds.add(doc["kind"])
            else:
                problems.append(f"{name}: no schema for {doc['apiVersion']} in Kubernetes "
                                f"{kube} (removed or misspelled API version?)")
    if not docs:
        problems.append("the render is empty")
    return problems, crds


def render_matrix(helm: Path, report: Report, out_dir: Path) -> None:
    for name, values in values_files():
        all_crds: set[str] = set()
        for kube in KUBE_VERSIONS:
            out = run(template_cmd(helm, values, kube))
            if out.returncode != 0:
                report.cell(name, kube, False, out.stderr.strip())
                continue
            (out_dir / f"{name}-{kube}.yaml").write_text(out.stdout)
            problems, crds = validate_render(out.stdout, kube)
            all_crds |= crds
            report.cell(name, kube, not problems, "\n    ".join(problems))
        report.note(name, "crds (pytest)", ",".join(sorted(all_crds)) or "-")


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
        for column, cmd in (
                ("lint", [helm, "lint", "--strict", CHART, "-f", path]),
                ("1.33.0", template_cmd(helm, path, "1.33.0"))):
            out = run(cmd)
            text = out.stdout + out.stderr
            missing = [w.pattern for w in wanted if not w.search(text)]
            if out.returncode == 0:
                report.cell(row, column, False, "accepted; it must be rejected")
            else:
                report.cell(row, column, not missing,
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
        shutil.copy(out_dir / f"{name}-1.33.0.yaml", kube_dir / f"{name}.yaml")
    env = {**os.environ, "PATH": f"{helm.parent}:{os.environ.get('PATH', '')}"}
    runs = {"checkov": [checkov_bin, "-d", kube_dir, "--framework", "kubernetes"],
            "checkov helm": [checkov_bin, "-d", CHART, "--framework", "helm"]}
    for column, cmd in runs.items():
        out = run([*cmd, "--skip-download", "--quiet", "--compact", "-o", "json"], env=env)
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            report.cell("checkov", column, False, f"no JSON from checkov:\n{out.stderr[-2000:]}")
            continue
        results = data if isinstance(data, list) else [data]
        if not any("results" in r for r in results) and out.returncode not in (0, 1):
            report.cell("checkov", column, False, out.stderr[-2000:])
            continue
        passed = failed = 0
        per_file: dict[str, list[str]] = {}
        for result in results:
            failed_checks = (result.get("results") or {}).get("failed_checks") or []
            passed += len((result.get("results") or {}).get("passed_checks") or [])
            for check in failed_checks:
                resource = str(check.get("resource"))
                hit = [s for s in skips if s.covers(check["check_id"], resource)]
                for s in hit:
                    s.used = True
                if not hit:
                    failed += 1
                    where = Path(str(check.get("file_path", "?"))).name
                    per_file.setdefault(where, []).append(
                        f"{check['check_id']} {resource}: {check.get('check_name')}")
        for where, lines in sorted(per_file.items()):
            report.cell("checkov", f"{column}: {where}", False, "\n    ".join(lines))
        report.cell("checkov", column, not per_file, f"{failed} unreviewed failures")
        report.note("checkov", f"{column} passed", str(passed))
    unused = [s.check for s in skips if not s.used]
    report.cell("checkov", "skips used", not unused,
                f"skips in {SKIPS.name} that match no failure any more (remove them): {unused}")


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
    columns: list[str] = []
    for cells in report.rows.values():
        columns += [c for c in cells if c not in columns]
    print(report.table(columns))
    print(f"\ntimes: {', '.join(timings)}; total {time.monotonic() - start:.1f} s")
    if report.failures:
        print(f"\n{len(report.failures)} FAILED:")
        for failure in report.failures:
            print(f"  {failure}")
        return 1
    print("helm checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
