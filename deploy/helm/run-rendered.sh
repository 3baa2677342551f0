#!/usr/bin/env bash
# The chart's rendered containers run with Docker, as the kubelet would run them: the
# chart's wiring tested for real, not only its YAML.
#
#   bash deploy/helm/run-rendered.sh [VALUES]     # a ci/VALUES-values.yaml; default cpu-only
#
# 1. `helm template` of the values (Kubernetes 1.33, the release's namespace);
# 2. deploy/helm/rendered.py turns each workload's main container into a `docker run`:
#    the image (cascade-*:$CASCADE_IMAGE_TAG, default `local`, built by
#    deploy/images/build-local.sh when missing; Redis: $REDIS_IMAGE, else the rendered
#    image if this daemon has it, else cascade-redis:local), the container's own env with
#    the rendered Secrets resolved and $(VAR) expanded (an env file, mode 600, never the
#    command line), its command/args (none: the image's CMD), and its security context and
#    limits (--user, --read-only, emptyDirs as --tmpfs, --cap-drop ALL,
#    no-new-privileges, --memory);
# 3. one private Docker network; each container carries every name of the Services that
#    select its pod as --network-alias (NAME, NAME.NS, NAME.NS.svc,
#    NAME.NS.svc.cluster.local), so the rendered URLs resolve unchanged;
# 4. Redis and the stages first, then the orchestrator, each waited for through its
#    rendered readiness probe run inside it (HTTP GET with the image's Python, or the exec
#    command); the uid each runs as;
# 5. one Realtime exchange inside the orchestrator container (realtime_check.py: the
#    rendered API key, session.created, a text turn answered with audio, a wrong key
#    refused);
# 6. `docker stop` (SIGTERM) of each, orchestrator first, allowed
#    terminationGracePeriodSeconds minus the preStop sleep: exit code and time.
# Prints a table; exits 1 if anything failed. Containers, network, env files and (if it
# started one) the private Docker daemon with its host changes go away whatever happens.
# Needs root, docker.io (dockerd.sh) and debootstrap where images must be built.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/images/dockerd.sh
source deploy/images/dockerd.sh

VALUES=${1:-cpu-only}
TAG=${CASCADE_IMAGE_TAG:-local}
NS=cascade
RUN=cascade-rendered-$$
READY_TIMEOUT_S=${CASCADE_RENDERED_TIMEOUT_S:-300}
CHART=deploy/helm/cascade
values_file=$CHART/ci/$VALUES-values.yaml
[ -f "$values_file" ] || { echo "run-rendered.sh: no $values_file" >&2; exit 2; }

containers=()
work=$(mktemp -d /tmp/cascade-rendered.XXXXXX)
chmod 700 "$work"
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local c
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  docker network rm "$RUN" >/dev/null 2>&1 || true
  dockerd_down
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log() { echo "run-rendered.sh: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN {printf "%.1f", a - b}'; }

bin=$(bash deploy/helm/tools.sh | tail -n 1)
python=${CASCADE_HELM_CACHE:-$HOME/.cache/cascade-helm}/tools-venv/bin/python
"$bin/helm" template cascade "$CHART" -n "$NS" --kube-version 1.33.0 -f "$values_file" \
  --api-versions monitoring.coreos.com/v1 --api-versions keda.sh/v1alpha1 >"$work/render.yaml"

dockerd_up
# --- images
rendered_redis=$("$python" - "$work/render.yaml" <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "StatefulSet":
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") == "redis":
            print(doc["spec"]["template"]["spec"]["containers"][0]["image"])
EOF
)
missing=()
for image in orchestrator asr tts llm-cpu; do
  grep -q "image: cascade-$image:" "$work/render.yaml" || continue
  docker image inspect "cascade-$image:$TAG" >/dev/null 2>&1 || missing+=("$image")
done
redis_image=""
if [ -n "$rendered_redis" ]; then
  if [ -n "${REDIS_IMAGE:-}" ]; then
    redis_image=$REDIS_IMAGE
  elif docker image inspect "$rendered_redis" >/dev/null 2>&1; then
    redis_image=$rendered_redis
  else
    redis_image=cascade-redis:$TAG
    docker image inspect "$redis_image" >/dev/null 2>&1 || missing+=(redis)
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "building ${missing[*]} (deploy/images/build-local.sh)"
  bash deploy/images/build-local.sh "${missing[@]}" >&2
fi

# --- the plan: one line of shell-quoted fields per container, env files in $work
plan_args=(docker-plan "$work/render.yaml" --namespace "$NS" --out "$work" --cascade-tag "$TAG")
[ -z "$redis_image" ] || plan_args+=(--redis-image "$redis_image")
"$python" deploy/helm/rendered.py "${plan_args[@]}" >"$work/plan"

# probe NAME KIND PORT PATH COMMAND: the rendered readiness probe, run inside the container.
probe() {
  local name=$1 kind=$2 port=$3 path=$4 command=$5
  case "$kind" in
    http) docker exec "$name" python -c 'import sys, urllib.request as u
u.urlopen("http://127.0.0.1:%s%s" % (sys.argv[1], sys.argv[2]), timeout=3)' "$port" "$path" \
            >/dev/null 2>&1 ;;
    tcp) docker exec "$name" python -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 3)' "$port" >/dev/null 2>&1 ;;
    exec) eval "set -- $command"; docker exec "$name" "$@" >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

docker network create "$RUN" >/dev/null
declare -A READY UID_OF PROBE GRACE PRESTOP IMAGE
order=()
failed=0
T0=$(now)
while IFS= read -r line; do
  # Fields: component image env_file grace prestop aliases probe_* options entrypoint argv
  # port (deploy/helm/rendered.py docker_plan, each shlex-quoted).
  component="" image="" env_file="" grace="" prestop="" aliases="" probe_kind="" probe_port=""
  probe_path="" probe_command="" probe_describe="" options="" entrypoint="" argv="" port=""
  eval "$line"
  name=$RUN-$component
  run=(docker run -d --name "$name" --network "$RUN" --env-file "$env_file")
  for alias in $aliases; do run+=(--network-alias "$alias"); done
  eval "set -- $options"
  run+=("$@")
  [ -z "$entrypoint" ] || run+=(--entrypoint "$entrypoint")
  eval "set -- $argv"
  run+=("$image" "$@")
  "${run[@]}" 2>&1 >/dev/null | { grep -v 'IPv4 forwarding is disabled' || true; } >&2
  containers+=("$name")
  order+=("$component")
  GRACE[$component]=$grace PRESTOP[$component]=$prestop IMAGE[$component]=$image
  PROBE[$component]=$probe_describe
  started=$(now)
  deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
  until probe "$name" "$probe_kind" "$probe_port" "$probe_path" "$probe_command"; do
    state=$(docker inspect -f '{{.State.Status}}' "$name")
    if [ "$state" != running ] || [ "$(date +%s)" -gt "$deadline" ]; then
      docker logs --tail 40 "$name" >&2 || true
      log "$component: not ready ($state) after $(since "$started") s"
      exit 1
    fi
    sleep 0.5
  done
  READY[$component]=$(since "$started")
  UID_OF[$component]=$(docker exec "$name" id -u 2>/dev/null || echo "?")
  log "$component ready in ${READY[$component]} s (${probe_describe})"
done <"$work/plan"
log "all ready in $(since "$T0") s"

# --- one Realtime exchange, inside the orchestrator container
orch=$RUN-orchestrator
key=$(grep '^CASCADE_API_KEY=' "$work/orchestrator.env" | cut -d= -f2-)
port=$(awk '/component=orchestrator/' "$work/plan" | sed -n "s/.* port=\([0-9]*\).*/\1/p")
docker exec "$orch" python -c 'import sys, urllib.request as u
print(u.urlopen("http://127.0.0.1:%s/readyz" % sys.argv[1], timeout=5).read().decode())' \
  "${port:-8000}" | cut -c1-400
if exchange=$(docker exec -i -e CHECK_API_KEY="$key" "$orch" python - \
      "ws://127.0.0.1:${port:-8000}" <deploy/helm/realtime_check.py); then
  exchange_ok=1
else
  exchange_ok=0
  failed=1
fi
echo "exchange: $exchange"

# --- SIGTERM, orchestrator first
declare -A STOP
for (( i=${#order[@]}-1; i>=0; i-- )); do
  component=${order[$i]}
  allowed=$(( GRACE[$component] - PRESTOP[$component] ))
  started=$(now)
  docker stop -t "$allowed" "$RUN-$component" >/dev/null
  took=$(since "$started")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$RUN-$component")
  STOP[$component]="exit $code in $took/$allowed s"
  [ "$code" = 0 ] || failed=1
done

printf '\n%-13s %-32s %7s %5s  %-26s %s\n' COMPONENT IMAGE READY_S UID READINESS STOP
for component in "${order[@]}"; do
  printf '%-13s %-32s %7s %5s  %-26s %s\n' "$component" "${IMAGE[$component]}" \
    "${READY[$component]}" "${UID_OF[$component]}" "${PROBE[$component]}" "${STOP[$component]}"
  case "${IMAGE[$component]}" in
    *cascade-*) [ "${UID_OF[$component]}" != 0 ] || { log "$component runs as root"; failed=1; } ;;
  esac
done
[ "$exchange_ok" = 1 ] || log "the Realtime exchange failed"
if [ "$failed" = 0 ]; then
  echo "run-rendered: PASSED ($VALUES, $(since "$T0") s)"
else
  echo "run-rendered: FAILED ($VALUES)"
  exit 1
fi
