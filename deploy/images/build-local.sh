#!/usr/bin/env bash
# Builds cascade's images on a machine that reaches package registries but no image
# registry (our development machines and CI): `FROM python:...` cannot be pulled there.
#
#   bash deploy/images/build-local.sh                 # every CPU image
#   bash deploy/images/build-local.sh asr tts         # only these
#   bash deploy/images/build-local.sh --gpu           # the CPU images, asr-cuda and tts-gpu
#   bash deploy/images/build-local.sh --no-cache      # ignore the layer cache (a cold build)
#   bash deploy/images/build-local.sh --rebuild-base  # debootstrap the base image again
#   bash deploy/images/build-local.sh redis           # cascade-redis:local (multi-run.sh)
#
# What it does, in order:
# 1. Uses the Docker daemon that answers, or starts a private one (deploy/images/dockerd.sh:
#    its data root, and so the layer cache, lives in $CASCADE_IMAGES_CACHE, default
#    ~/.cache/cascade-images; the daemon is stopped and its host changes undone on exit).
# 2. The base image cascade-base:bookworm, once: Debian bookworm by debootstrap (minbase
#    with python3, python3-venv, ca-certificates, libgomp1) from this machine's Debian
#    mirror, then `docker import`. Its apt sources are left empty, so no host name of this
#    machine's mirror ends up in an image.
# 3. The llama-cpp-python wheel, once per machine (~5-8 min on 2 cores; kept in the cache):
#    compiled here with the portable CMAKE_ARGS of deploy/install.sh, so no image build
#    compiles it. The wheel is built against this host's glibc: the host must not be newer
#    than the base image (Debian bookworm here).
# 4. Each image: `docker build --network host --build-arg BASE_IMAGE=cascade-base:bookworm`
#    with the host's CA bundle ($PIP_CERT, $SSL_CERT_FILE or the system bundle) and the
#    wheel in deploy/images/extra/ (git-ignored; only builder stages read it; the bundle is
#    removed again when the script ends) and the host's package index settings, if any,
#    as build arguments of the builder stage. Images are tagged cascade-NAME:local.
# `redis` (only when named) is no Dockerfile: Debian bookworm's redis-server by debootstrap
# like the base, imported as cascade-redis:local, for deploy/images/multi-run.sh where the
# public redis image cannot be pulled.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/images/dockerd.sh
source deploy/images/dockerd.sh

BASE=cascade-base:bookworm
TAG=${CASCADE_IMAGE_TAG:-local}
CPU_IMAGES=(orchestrator asr tts llm-cpu all-in-one)
GPU_IMAGES=(asr-cuda tts-gpu)
EXTRA=deploy/images/extra
# The classic builder: this daemon and client have no BuildKit/buildx here, and the
# Dockerfiles need neither.
export DOCKER_BUILDKIT=0

images=() no_cache=() rebuild_base=0 gpu=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    --no-cache) no_cache=(--no-cache) ;;
    --rebuild-base) rebuild_base=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    -*) echo "build-local.sh: unknown option $arg" >&2; exit 2 ;;
    redis) images+=(redis) ;;
    *) [ -f "deploy/images/$arg/Dockerfile" ] || { echo "no image $arg" >&2; exit 2; }
       images+=("$arg") ;;
  esac
done
if [ ${#images[@]} -eq 0 ]; then
  images=("${CPU_IMAGES[@]}")
  [ "$gpu" = 0 ] || images+=("${GPU_IMAGES[@]}")
fi

cleanup() {
  rm -rf "$EXTRA/certs"
  dockerd_down
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "build-local.sh: $*" >&2; }

# The Debian mirror apt uses on this machine (printed by apt-cache policy after an update);
# empty: debootstrap's own default.
debian_mirror() {
  apt-cache policy 2>/dev/null |
    awk '$3 == "bookworm/main" && $4 == "amd64" {print $2; exit}'
}

# debootstrap_image TAG PACKAGES [docker import options...]: Debian bookworm (minbase plus
# the comma-separated PACKAGES) from this machine's Debian mirror, imported as TAG. Its apt
# sources are emptied, so no host name of the local mirror is left in the image.
debootstrap_image() {
  local tag=$1 packages=$2 rootfs mirror
  shift 2
  command -v debootstrap >/dev/null || {
    log "debootstrap is missing (apt-get install debootstrap)"
    return 1
  }
  mirror=$(debian_mirror)
  mkdir -p "$CASCADE_IMAGES_CACHE"
  rootfs=$(mktemp -d "$CASCADE_IMAGES_CACHE/rootfs.XXXXXX")
  log "debootstrap bookworm with $packages for $tag (~1 min)"
  if ! debootstrap --variant=minbase --include="$packages" \
      bookworm "$rootfs" ${mirror:+"$mirror"} >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    return 1
  fi
  : >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/etc/apt/sources.list.d/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs.log"
  tar --numeric-owner -C "$rootfs" -c . | docker import "$@" - "$tag" >/dev/null
  rm -rf "$rootfs"
}

build_base() {
  if [ "$rebuild_base" = 0 ] && docker image inspect "$BASE" >/dev/null 2>&1; then
    return 0
  fi
  local start
  start=$(date +%s)
  debootstrap_image "$BASE" python3,python3-venv,ca-certificates,libgomp1 \
    --change 'CMD ["python3"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8'
  log "base image $BASE in $(( $(date +%s) - start )) s"
}

# Redis for the multi-container run (deploy/images/multi-run.sh) where `docker pull redis`
# is impossible: Debian's redis-server (7.0), run as its `redis` user, in the foreground,
# listening on every address of the container's network without protected mode (as the
# public image does; the network is private), no persistence (the run's sessions die
# with it).
build_redis() {
  local cmd='["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no",'
  cmd+=' "--save", "", "--appendonly", "no"]'
  debootstrap_image "cascade-redis:$TAG" redis-server \
    --change 'USER redis' --change 'WORKDIR /var/lib/redis' --change 'EXPOSE 6379' \
    --change 'ENV LANG=C.UTF-8' --change "CMD $cmd"
}

# The llama-cpp-python wheel for the llm-cpu and all-in-one images, compiled once.
llama_wheel() {
  local req version dir start
  req=$(python3 deploy/images/requirements.py pyproject.toml deps llm | grep '^llama-cpp-python==')
  version=${req#*==}
  dir=$CASCADE_IMAGES_CACHE/wheels
  mkdir -p "$dir" "$EXTRA/wheels"
  if ! ls "$dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    log "compiling $req once for this machine (~5-8 min on 2 cores)"
    start=$(date +%s)
    if ! CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        nice -n 10 python3 -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python --disable-pip-version-check -w "$dir" "$req" \
        >"$dir/build.log" 2>&1; then
      grep -v "^WARNING: Location" "$dir/build.log" | tail -30 >&2
      return 1
    fi
    log "llama-cpp-python wheel in $(( $(date +%s) - start )) s"
  fi
  find "$EXTRA/wheels" -name 'llama_cpp_python-*.whl' ! -name "*-$version-*" -delete
  cp -p "$dir"/llama_cpp_python-"$version"-*.whl "$EXTRA/wheels/"
}

ca_bundle() {
  local bundle
  for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$bundle" ] && [ -f "$bundle" ]; then
      mkdir -p "$EXTRA/certs"
      cp "$bundle" "$EXTRA/certs/ca-certificates.crt"
      return 0
    fi
  done
}

# The host's package index settings (environment, then pip's config), for pip and uv in the
# builder stages; file:// indexes of this machine mean nothing inside a build and are left out.
index_args() {
  local index extra
  index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
  extra=${PIP_EXTRA_INDEX_URL:-$(python3 -m pip config get global.extra-index-url 2>/dev/null || true)}
  extra=$(tr ' ' '\n' <<<"$extra" | grep -v '^file:' | grep . | tr '\n' ' ' || true)
  extra=${extra% }
  index=$(grep -v '^file:' <<<"$index" || true)
  [ -z "$index" ] || printf '%s\n' --build-arg "PIP_INDEX_URL=$index"
  [ -z "$extra" ] || printf '%s\n' --build-arg "PIP_EXTRA_INDEX_URL=$extra"
  [ -z "${UV_DEFAULT_INDEX:-$index}" ] ||
    printf '%s\n' --build-arg "UV_DEFAULT_INDEX=${UV_DEFAULT_INDEX:-$index}"
  [ -z "${UV_INDEX:-$extra}" ] || printf '%s\n' --build-arg "UV_INDEX=${UV_INDEX:-$extra}"
}

dockerd_up
needs_base=0 needs_llama=0
for image in "${images[@]}"; do
  case "$image" in
    redis) ;;
    llm-cpu|all-in-one) needs_base=1 needs_llama=1 ;;
    *) needs_base=1 ;;
  esac
done
[ "$needs_base" = 0 ] || build_base
[ "$needs_llama" = 0 ] || llama_wheel
ca_bundle
mapfile -t build_args < <(index_args)

declare -A took
for image in "${images[@]}"; do
  log "building cascade-$image:$TAG"
  start=$(date +%s)
  if [ "$image" = redis ]; then
    build_redis
    took[$image]=$(( $(date +%s) - start ))
    continue
  fi
  logfile=$(mktemp)
  if ! docker build --network host "${no_cache[@]}" --build-arg "BASE_IMAGE=$BASE" \
      "${build_args[@]}" -f "deploy/images/$image/Dockerfile" -t "cascade-$image:$TAG" . \
      >"$logfile" 2>&1; then
    tail -40 "$logfile" >&2
    rm -f "$logfile"
    log "cascade-$image failed"
    exit 1
  fi
  rm -f "$logfile"
  took[$image]=$(( $(date +%s) - start ))
done

printf '\n%-28s %10s %8s\n' IMAGE SIZE BUILD_S
for image in "${images[@]}"; do
  size=$(docker image inspect -f '{{.Size}}' "cascade-$image:$TAG")
  printf '%-28s %7d MB %8s\n' "cascade-$image:$TAG" $(( size / 1000000 )) "${took[$image]}"
done
