#!/usr/bin/env bash
# Runs each CPU image built by build-local.sh on a private Docker network and checks it
# for real: Docker's HEALTHCHECK turns healthy, the server runs as a non-root user, one
# request per image gets a real answer (deploy/images/smoke_requests.py: TTS speaks a
# sentence, ASR transcribes that WAV, the LLM completes a chat, the orchestrator wired to
# the three stage containers by CASCADE_*_URL and the all-in-one report ready), and
# `docker stop` (SIGTERM) ends each server cleanly (exit 0, no SIGKILL). Prints a table;
# exits 1 if anything failed.
#
#   bash deploy/images/smoke.sh                # images tagged :local ($CASCADE_IMAGE_TAG)
#
# Cleans up whatever happens: its containers, its network, and the Docker daemon with
# its host changes if it started one (deploy/images/dockerd.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/images/dockerd.sh
source deploy/images/dockerd.sh

TAG=${CASCADE_IMAGE_TAG:-local}
RUN=cascade-smoke-$$
READY_TIMEOUT_S=${CASCADE_SMOKE_TIMEOUT_S:-240}
containers=()

cleanup() {
  local c
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  docker network rm "$RUN" >/dev/null 2>&1 || true
  dockerd_down
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "smoke.sh: $*" >&2; }
now() { date +%s.%N; }
# since T [DIGITS]: seconds from T to now.
since() { awk -v a="$(now)" -v b="$1" -v d="${2:-1}" 'BEGIN {printf "%.*f", d, a - b}'; }

# start NAME IMAGE [docker run options...]: the container answers as NAME on the network.
start() {
  local name=$1 image=$2
  shift 2
  docker image inspect "cascade-$image:$TAG" >/dev/null 2>&1 || {
    log "no image cascade-$image:$TAG (bash deploy/images/build-local.sh)"
    return 1
  }
  # (Docker warns that ip_forward is off: nothing here is routed, the network is a bridge.)
  docker run -d --name "$RUN-$name" --network "$RUN" --network-alias "$name" "$@" \
    "cascade-$image:$TAG" 2>&1 >/dev/null | { grep -v 'IPv4 forwarding is disabled' || true; } >&2
  containers+=("$RUN-$name")
  started[$name]=$(now)
}

ip_of() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$RUN-$1"
}

# wait_ready NAME...: seconds from each container's start until its /readyz answers 200
# (polled from the host every 0.5 s, all containers at once), then until Docker's own
# HEALTHCHECK says healthy (it probes every 10 s, so that figure is coarser).
wait_ready() {
  local name deadline pending=("$@") left
  deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
  while [ ${#pending[@]} -gt 0 ]; do
    left=()
    for name in "${pending[@]}"; do
      if [ -z "${ready[$name]:-}" ] &&
         python3 -c "import urllib.request as u; u.urlopen('http://$(ip_of "$name"):${port[$name]}/readyz', timeout=2)" 2>/dev/null; then
        ready[$name]=$(since "${started[$name]}")
      fi
      if [ -n "${ready[$name]:-}" ] &&
         [ "$(docker inspect -f '{{.State.Health.Status}}' "$RUN-$name")" = healthy ]; then
        healthy[$name]=$(since "${started[$name]}" 0)
        user[$name]=$(docker exec "$RUN-$name" id -u)
        continue
      fi
      if [ "$(docker inspect -f '{{.State.Running}}' "$RUN-$name")" != true ] ||
         [ "$(date +%s)" -gt "$deadline" ]; then
        log "$name never became ready and healthy; its log:"
        docker logs --tail 30 "$RUN-$name" >&2
        failed=1
        continue
      fi
      left+=("$name")
    done
    pending=("${left[@]}")
    [ ${#pending[@]} -eq 0 ] || sleep 0.5
  done
}

# When a `docker logs -t` line matching PATTERN was written (seconds since the epoch).
logged_at() {
  local stamp
  stamp=$(docker logs -t "$RUN-$1" 2>&1 | grep -m1 -- "$2" | cut -d' ' -f1)
  [ -n "$stamp" ] && date -d "$stamp" +%s.%N
}

# SIGTERM (docker stop) must end the server itself: exit 0 well before the 30 s SIGKILL.
# Reported: the server's own drain (uvicorn's "Shutting down" to "Finished server
# process") and the whole `docker stop` (signal delivery and container teardown too).
stop() {
  local name=$1 t0 code took down done_at drain=?
  t0=$(now)
  docker stop -t 30 "$RUN-$name" >/dev/null
  took=$(since "$t0")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$RUN-$name")
  down=$(logged_at "$name" "Shutting down" || true)
  done_at=$(logged_at "$name" "Finished server process" || true)
  if [ -n "$down" ] && [ -n "$done_at" ]; then
    drain=$(awk -v a="$done_at" -v b="$down" 'BEGIN {printf "%.2f", a - b}')
    log "$name: SIGTERM seen after $(awk -v a="$down" -v b="$t0" 'BEGIN {printf "%.2f", a - b}') s, drained in $drain s, docker stop returned after $took s"
  fi
  stopped[$name]="exit $code, drain ${drain} s/${took} s"
  [ "$code" = 0 ] && [ "$drain" != "?" ] || failed=1
}

declare -A started ready healthy user stopped port=(
  [asr]=8001 [llm]=8002 [tts]=8003 [orchestrator]=8000 [all-in-one]=8000)
failed=0
dockerd_up
docker network create "$RUN" >/dev/null

# The distributed shape: three stage containers and an orchestrator wired to them by name.
start asr asr
start tts tts
start llm llm-cpu
start orchestrator orchestrator -e CASCADE_ASR_URL=http://asr:8001 \
  -e CASCADE_LLM_URL=http://llm:8002 -e CASCADE_TTS_URL=http://tts:8003
wait_ready asr tts llm orchestrator
requests=(tts="http://$(ip_of tts):8003" asr="http://$(ip_of asr):8001"
          llm="http://$(ip_of llm):8002" orchestrator="http://$(ip_of orchestrator):8000")
results=$(python3 deploy/images/smoke_requests.py "${requests[@]}") || failed=1
for name in orchestrator asr tts llm; do stop "$name"; done
# The laptop shape, alone on the CPU: one process with every model.
start all-in-one all-in-one
wait_ready all-in-one
results+=$'\n'$(python3 deploy/images/smoke_requests.py \
  all-in-one="http://$(ip_of all-in-one):8000") || failed=1
stop all-in-one

printf '\n%-14s %-5s %7s %9s %-27s %s\n' IMAGE UID READY_S HEALTHY_S STOP REQUEST
for name in asr tts llm orchestrator all-in-one; do
  line=$(awk -F'\t' -v n="$name" '$1 == n {print $2 " " $3}' <<<"$results")
  printf '%-14s %-5s %7s %9s %-27s %s\n' "$name" "${user[$name]:-?}" "${ready[$name]:-?}" \
    "${healthy[$name]:-?}" "${stopped[$name]:-?}" "${line:-not run}"
  [ "${user[$name]:-0}" != 0 ] || failed=1
done
if [ "$failed" = 0 ]; then echo "smoke: all images passed"; else echo "smoke: FAILED"; fi
exit "$failed"
