# shellcheck shell=bash
# Sourced by build-local.sh and smoke.sh: a Docker daemon for the duration of one script.
#
#   source deploy/images/dockerd.sh
#   dockerd_up        # use a reachable daemon, or start a private one
#   ...
#   dockerd_down      # in the caller's EXIT trap: stops the private one, undoes its changes
#
# A daemon that already answers (DOCKER_HOST or the default socket) is used as it is and
# never stopped. Otherwise a private dockerd starts with its own socket and exec root under
# /tmp and its data root under the cache folder (so image layers and the build cache
# survive between runs), and with every host-wide side effect it could have turned off:
# no docker0 bridge (--bridge=none), no iptables rules (--iptables=false), no ip_forward
# change. Builds then use the host network (`docker build --network host`) and containers
# a private user-defined network (its bridge goes away with the network). On exit the
# daemon is stopped, and anything it still changed is undone: iptables chains named
# DOCKER* and the rules that jump to them (only those that were not there before),
# bridges that appeared (docker0, br-* of networks a killed caller left), ip_forward
# (restored to its old value).

CASCADE_IMAGES_CACHE=${CASCADE_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cascade-images}
_dockerd_run=""
_dockerd_pid=""

_docker_chains() {
  command -v iptables >/dev/null 2>&1 || return 0
  local table
  for table in filter nat; do
    iptables -w -t "$table" -S 2>/dev/null | awk -v t="$table" '$1 == "-N" && $2 ~ /^DOCKER/ {print t, $2}'
  done | sort
}

_bridges() {
  ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | sort
}

dockerd_up() {
  if docker info >/dev/null 2>&1; then
    echo "dockerd: using the running daemon" >&2
    return 0
  fi
  command -v dockerd >/dev/null || {
    echo "dockerd: not installed (apt-get install docker.io)" >&2
    return 1
  }
  [ "$(id -u)" = 0 ] || { echo "dockerd: starting a daemon needs root" >&2; return 1; }
  mkdir -p "$CASCADE_IMAGES_CACHE"
  # One private daemon per data root at a time (two would corrupt it): wait for the lock.
  exec {_dockerd_lock_fd}>"$CASCADE_IMAGES_CACHE/dockerd.lock"
  if ! flock -n "$_dockerd_lock_fd"; then
    echo "dockerd: another script holds $CASCADE_IMAGES_CACHE/dockerd.lock; waiting" >&2
    flock "$_dockerd_lock_fd"
  fi
  _dockerd_run=$(mktemp -d /tmp/cascade-dockerd.XXXXXX)
  _dockerd_forward=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo "")
  _dockerd_bridges_before=$(_bridges)
  _dockerd_chains_before=$(_docker_chains)
  dockerd --data-root "$CASCADE_IMAGES_CACHE/docker" --exec-root "$_dockerd_run/exec" \
    --pidfile "$_dockerd_run/dockerd.pid" -H "unix://$_dockerd_run/docker.sock" \
    --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >"$_dockerd_run/dockerd.log" 2>&1 &
  _dockerd_pid=$!
  export DOCKER_HOST="unix://$_dockerd_run/docker.sock"
  local i
  for i in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      echo "dockerd: started (pid $_dockerd_pid)" >&2
      # Containers and networks a killed run left in this private data root.
      docker container prune -f >/dev/null 2>&1 || true
      docker network prune -f >/dev/null 2>&1 || true
      return 0
    fi
    kill -0 "$_dockerd_pid" 2>/dev/null || break
    sleep 0.5
  done
  echo "dockerd: did not start; its log:" >&2
  tail -20 "$_dockerd_run/dockerd.log" >&2
  return 1
}

dockerd_down() {
  [ -n "$_dockerd_pid" ] || return 0
  local pid=$_dockerd_pid i
  _dockerd_pid=""
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  # Undo what a daemon may have changed despite the flags above.
  local table chain
  while read -r table chain; do
    [ -n "$chain" ] || continue
    grep -qx "$table $chain" <<<"$_dockerd_chains_before" && continue
    iptables -w -t "$table" -S | awk -v c="$chain" '$1 == "-A" && $0 ~ ("-j " c "( |$)") && $2 != c' |
      while read -r rule; do
        # shellcheck disable=SC2086  # a rule is a list of words, as iptables -S prints it
        iptables -w -t "$table" ${rule/-A/-D} 2>/dev/null || true
      done
    iptables -w -t "$table" -F "$chain" 2>/dev/null || true
    iptables -w -t "$table" -X "$chain" 2>/dev/null || true
  done < <(_docker_chains)
  # docker0 and the br-* bridge of a user network the caller could not remove (killed
  # midway): a stopped daemon leaves them behind.
  local bridge
  for bridge in $(comm -13 <(echo "$_dockerd_bridges_before") <(_bridges)); do
    case "$bridge" in docker0|br-*) ip link delete "$bridge" 2>/dev/null || true ;; esac
  done
  if [ -n "$_dockerd_forward" ] &&
     [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$_dockerd_forward" ]; then
    echo "$_dockerd_forward" >/proc/sys/net/ipv4/ip_forward || true
  fi
  # Mounts a killed daemon left under its exec root (network namespaces) go first.
  awk -v d="$_dockerd_run/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$_dockerd_run"
  echo "dockerd: stopped, host network settings as before" >&2
}
