#!/usr/bin/env bash
# Every static check of the Helm chart deploy/helm/cascade, offline and without a cluster:
# helm lint --strict, helm template x Kubernetes 1.29/1.33/1.37 validated strictly
# (kubernetes-validate), values the schema must reject (tests/deploy/helm/bad/), checkov
# against the reviewed skip list (checkov-skips.yaml). Prints a table; exits 1 on any
# failure. What a render means (selectors, ports, network paths, secrets) is checked by
# the pytest suite tests/deploy/helm/.
#   bash deploy/helm/check.sh [--no-checkov] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(bash deploy/helm/tools.sh | tail -n 1)
export CASCADE_HELM_BIN=$bin
exec "${CASCADE_HELM_CACHE:-$HOME/.cache/cascade-helm}/tools-venv/bin/python" \
  deploy/helm/check.py "$@"
