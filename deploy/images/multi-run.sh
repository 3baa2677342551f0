#!/usr/bin/env bash
# The distributed shape for real, on one Docker host: Redis, 2 ASR, 1 LLM and 2 TTS
# containers and 2 orchestrator containers sharing Redis on a private Docker network, then
# the failover drill (benchmarks/failover.py) run from the host with the openai SDK: voice
# turns through both orchestrators, a TTS replica, an ASR replica and then an orchestrator
# container killed (`docker kill`, SIGKILL) mid-conversation. Prints the drill's report
# (failover figures, items lost, streams per replica), each stage container's final /load
# and every container's memory; exits with the drill's status.
#
#   bash deploy/images/multi-run.sh            # images tagged :local ($CASCADE_IMAGE_TAG)
#   bash deploy/images/multi-run.sh --build    # (re)build the images first (layer cache)
#
# Images: cascade-{orchestrator,asr,tts,llm-cpu}:local, built by build-local.sh when
# missing (--build: always, so the run tests the current code; a warm build takes seconds).
# Redis: $REDIS_IMAGE if set (`docker run` pulls it where a registry is reachable);
# otherwise the public redis:7.0.15-bookworm if this daemon already has it; otherwise
# cascade-redis:local, Debian's redis-server imported by `build-local.sh redis` (no
# registry needed).
#
# How the orchestrators reach the stages (what the run exercises):
# - both ASR containers carry the network alias `asr`: Docker's embedded DNS answers that
#   one name with both addresses, and the orchestrators get `CASCADE_ASR_URL=http://asr:8001`,
#   which stages/common/replicas.py expands into one replica per address
#   (http://172.x.y.z:8001);
# - the TTS containers are a comma list, `http://tts-1:8003,http://tts-2:8003`;
# - each orchestrator's port is published on 127.0.0.1 only (a free port Docker picks).
# The script checks the DNS expansion before starting the orchestrators (works with the
# private daemon's --iptables=false: the embedded DNS's redirect lives in each container's
# own network namespace, not the host's tables).
#
# Settings (environment): CASCADE_MULTI_OUT (the drill's report folder, default
# out/multi-run), CASCADE_MULTI_TIMEOUT_S (containers healthy within, default 400),
# CASCADE_MULTI_PYTHON (the drill's Python, default .venv/bin/python: the repository's venv
# with the dev dependencies). Cleans up whatever happens: its containers, its network, and
# the Docker daemon with its host changes if it started one (deploy/images/dockerd.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/images/dockerd.sh
source deploy/images/dockerd.sh

TAG=${CASCADE_IMAGE_TAG:-local}
RUN=cascade-multi-$$
OUT=${CASCADE_MULTI_OUT:-out/multi-run}
READY_TIMEOUT_S=${CASCADE_MULTI_TIMEOUT_S:-400}
PYTHON=${CASCADE_MULTI_PYTHON:-.venv/bin/python}
REDIS_PUBLIC=redis:7.0.15-bookworm
IMAGES=(orchestrator asr tts llm-cpu)
STAGES=(asr-1 asr-2 llm tts-1 tts-2)
declare -A PORT=([asr-1]=8001 [asr-2]=8001 [llm]=8002 [tts-1]=8003 [tts-2]=8003
                 [orchestrator-a]=8000 [orchestrator-b]=8000)
containers=()
drill_pid=""

build=0
for arg in "$@"; do
  case "$arg" in
    --build) build=1 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "multi-run.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local c
  [ -z "$drill_pid" ] || kill -TERM "$drill_pid" 2>/dev/null || true
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  docker network rm "$RUN" >/dev/null 2>&1 || true
  dockerd_down
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

T0=$(date +%s.%N)
log() { echo "multi-run.sh: $*" >&2; }
# since T: seconds from T to now.
since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN {printf "%.0f", a - b}'; }
die() { log "$*"; exit 1; }

# start NAME IMAGE [docker run options...]: container $RUN-NAME, reachable as NAME.
start() {
  local name=$1 image=$2
  shift 2
  # (Docker warns that ip_forward is off: nothing here is routed, the network is a bridge.)
  docker run -d --name "$RUN-$name" --network "$RUN" --network-alias "$name" "$@" \
    "$image" 2>&1 >/dev/null | { grep -v 'IPv4 forwarding is disabled' || true; } >&2
  containers+=("$RUN-$name")
}

ip_of() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$RUN-$1"
}

# wait_healthy NAME...: until Docker's HEALTHCHECK says healthy for each (the images probe
# /readyz every 10 s); a container that stops or misses the deadline fails the run.
wait_healthy() {
  local name status deadline pending=("$@") left
  deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
  while [ ${#pending[@]} -gt 0 ]; do
    left=()
    for name in "${pending[@]}"; do
      status=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$RUN-$name")
      case "$status" in
        "running healthy") log "$name healthy after $(since "$T_START") s" ;;
        running*) left+=("$name") ;;
        *) docker logs --tail 30 "$RUN-$name" >&2; die "$name stopped ($status)" ;;
      esac
    done
    pending=("${left[@]}")
    if [ ${#pending[@]} -gt 0 ]; then
      if [ "$(date +%s)" -gt "$deadline" ]; then
        for name in "${pending[@]}"; do docker logs --tail 30 "$RUN-$name" >&2; done
        die "not healthy within ${READY_TIMEOUT_S} s: ${pending[*]}"
      fi
      sleep 1
    fi
  done
}

# resolve NAME: the addresses Docker's embedded DNS gives NAME, as the stage containers
# see it (sorted, one line).
resolve() {
  docker exec "$RUN-asr-1" python -c 'import socket, sys
infos = socket.getaddrinfo(sys.argv[1], 80, type=socket.SOCK_STREAM)
print(" ".join(sorted({i[4][0] for i in infos})))' "$1"
}

# memory: each running container's memory now (docker stats), "NAME<TAB>MEM" lines.
memory() {
  local running
  mapfile -t running < <(docker ps --filter "name=^$RUN-" --format '{{.Names}}')
  docker stats --no-stream --format '{{.Name}}	{{.MemUsage}}' "${running[@]}" 2>/dev/null |
    sed "s/^$RUN-//; s| / .*||"
}

# The /load a stage container reports now, from inside it (the images have no curl).
load_of() {
  docker exec "$RUN-$1" python -c 'import sys, urllib.request as u
print(u.urlopen("http://127.0.0.1:%s/load" % sys.argv[1], timeout=5).read().decode())' \
    "${PORT[$1]}" 2>/dev/null ||
    echo "(not reachable: $(docker inspect -f '{{.State.Status}}' "$RUN-$1"))"
}

[ -x "$PYTHON" ] || die "no $PYTHON: the drill runs in the repository's venv (CASCADE_MULTI_PYTHON)"
dockerd_up

# --- images
missing=()
for image in "${IMAGES[@]}"; do
  if [ "$build" = 1 ] || ! docker image inspect "cascade-$image:$TAG" >/dev/null 2>&1; then
    missing+=("$image")
  fi
done
if [ -n "${REDIS_IMAGE:-}" ]; then
  redis_image=$REDIS_IMAGE
elif docker image inspect "$REDIS_PUBLIC" >/dev/null 2>&1; then
  redis_image=$REDIS_PUBLIC
else
  redis_image=cascade-redis:$TAG
  docker image inspect "$redis_image" >/dev/null 2>&1 || missing+=(redis)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "building ${missing[*]} (build-local.sh)"
  bash deploy/images/build-local.sh "${missing[@]}" >&2
fi
for image in "${IMAGES[@]}"; do
  created=$(docker image inspect -f '{{.Created}}' "cascade-$image:$TAG")
  log "cascade-$image:$TAG built ${created:0:19}"
done
log "redis: $redis_image"
T_IMAGES=$(since "$T0")

# --- containers
KEY=sk-multi-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
export CASCADE_API_KEY=$KEY  # handed to the orchestrators by name (-e), not on their command line
docker network create "$RUN" >/dev/null
T_START=$(date +%s.%N)
start redis "$redis_image" --health-cmd 'redis-cli ping' --health-interval 2s \
  --health-retries 30
start asr-1 "cascade-asr:$TAG" --network-alias asr
start asr-2 "cascade-asr:$TAG" --network-alias asr
start llm "cascade-llm-cpu:$TAG"
start tts-1 "cascade-tts:$TAG"
start tts-2 "cascade-tts:$TAG"

# Docker's embedded DNS on this network: `asr` must answer with both ASR addresses (the
# orchestrators' replica expansion depends on it), every other name with its container.
asr_ips=$(printf '%s\n' "$(ip_of asr-1)" "$(ip_of asr-2)" | LC_ALL=C sort | tr '\n' ' ')
asr_ips=${asr_ips% }
for _ in $(seq 1 20); do
  got=$(resolve asr 2>/dev/null || true)
  [ "$got" = "$asr_ips" ] && break
  sleep 0.5
done
[ "$got" = "$asr_ips" ] ||
  die "Docker's DNS gives asr -> '$got', expected both ASR containers '$asr_ips'"
for name in redis llm tts-1 tts-2; do
  [ "$(resolve "$name")" = "$(ip_of "$name")" ] || die "Docker's DNS does not resolve $name"
done
log "DNS: asr -> $asr_ips (one name, two replicas); redis, llm, tts-1, tts-2 resolve"

for name in orchestrator-a orchestrator-b; do
  start "$name" "cascade-orchestrator:$TAG" -p 127.0.0.1::8000 -e CASCADE_API_KEY \
    -e CASCADE_REDIS_URL=redis://redis:6379/0 -e CASCADE_ASR_URL=http://asr:8001 \
    -e CASCADE_LLM_URL=http://llm:8002 -e CASCADE_TTS_URL=http://tts-1:8003,http://tts-2:8003
done
wait_healthy redis asr-1 asr-2 llm tts-1 tts-2 orchestrator-a orchestrator-b
T_HEALTHY=$(since "$T_START")
P1=$(docker port "$RUN-orchestrator-a" 8000/tcp | head -1 | sed 's/.*://')
P2=$(docker port "$RUN-orchestrator-b" 8000/tcp | head -1 | sed 's/.*://')
A=http://127.0.0.1:$P1
B=http://127.0.0.1:$P2

# Both orchestrators, through their published ports, list both TTS names and the ASR
# replicas, all up: `asr` itself until their first ASR stream (the replica set starts
# resolving and polling with its first stream), then both ASR addresses (the drill kills
# whichever holds a stream by those URLs; by its ASR fault they are resolved).
tts="tts http://tts-1:8003 http://tts-2:8003"
expanded="asr http://${asr_ips// /:8001 http://}:8001 | $tts"
for base in "$A" "$B"; do
  for _ in $(seq 1 60); do
    got=$(python3 - "$base" <<'EOF' 2>/dev/null || true
import json, sys, urllib.request as u
stages = json.load(u.urlopen(sys.argv[1] + "/readyz", timeout=5))["stages"]
up = lambda stage: " ".join(sorted(r["url"] for r in stages[stage] if r["up"]))
print(f"asr {up('asr')} | tts {up('tts')}")
EOF
)
    [ "$got" = "$expanded" ] || [ "$got" = "asr http://asr:8001 | $tts" ] && break
    sleep 1
  done
  [ "$got" = "$expanded" ] || [ "$got" = "asr http://asr:8001 | $tts" ] ||
    die "$base/readyz: replicas '$got', expected 'asr http://asr:8001 | $tts' or '$expanded'"
done
log "orchestrators at $A and $B; replicas: $got"

# --- the drill
targets=(--target "$A=$RUN-orchestrator-a")
for name in asr-1 asr-2; do targets+=(--target "http://$(ip_of "$name"):8001=$RUN-$name"); done
for name in tts-1 tts-2; do targets+=(--target "http://$name:8003=$RUN-$name"); done
mem_before=$(memory)
log "running the failover drill (a few minutes)"
T_DRILL=$(date +%s.%N)
# In the background, so that an INT/TERM of this script ends the drill at once (bash runs a
# trap only once its foreground command returns; `wait` returns at the signal).
"$PYTHON" -m benchmarks.failover --orchestrator "$A" --orchestrator "$B" --api-key "$KEY" \
  --kill "docker kill {name}" "${targets[@]}" --out "$OUT" &
drill_pid=$!
rc=0
wait "$drill_pid" || rc=$?
drill_pid=""
T_DRILL=$(since "$T_DRILL")

# --- what the stage containers and Docker say afterwards
mkdir -p "$OUT"
mem_after=$(memory)
{
  printf '\n%-15s %-11s %-15s %-15s %s\n' CONTAINER STATE MEM_BEFORE MEM_AFTER "FINAL /load"
  for name in redis "${STAGES[@]}" orchestrator-a orchestrator-b; do
    load=-
    case " ${STAGES[*]} " in *" $name "*) load=$(load_of "$name") ;; esac
    printf '%-15s %-11s %-15s %-15s %s\n' "$name" \
      "$(docker inspect -f '{{.State.Status}}' "$RUN-$name")" \
      "$(awk -F'\t' -v n="$name" '$1 == n {print $2}' <<<"$mem_before")" \
      "$(awk -F'\t' -v n="$name" '$1 == n {print $2}' <<<"$mem_after")" "$load"
  done
} | tee "$OUT/containers.txt"
# The replica set as the surviving orchestrator sees it now: `asr` expanded into both
# addresses, the killed ASR and TTS replicas down.
python3 - "$B" <<'EOF' 2>&1 | tee -a "$OUT/containers.txt" || true
import json, sys, urllib.request as u
stages = json.load(u.urlopen(sys.argv[1] + "/readyz", timeout=5))["stages"]
print("\norchestrator-b's replicas after the drill:")
for stage, replicas in stages.items():
    for r in replicas:
        print(f"  {stage:4} {r['url']:26} {'up' if r['up'] else 'down: ' + str(r['reason'])}")
EOF
if [ "$rc" != 0 ]; then
  for name in "${STAGES[@]}" orchestrator-a orchestrator-b; do
    echo "--- $name"
    docker logs --tail 20 "$RUN-$name" 2>&1
  done >&2
fi
echo
echo "multi-run: $( [ "$rc" = 0 ] && echo PASSED || echo FAILED ); wall $(since "$T0") s" \
  "(images $T_IMAGES s, containers healthy in $T_HEALTHY s, drill $T_DRILL s; cleanup follows)"
exit "$rc"
