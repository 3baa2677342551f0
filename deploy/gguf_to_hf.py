"""Dequantize a GGUF chat model into a Hugging Face folder that vLLM can serve.

    python deploy/gguf_to_hf.py MODEL.gguf OUT_DIR

Runs in the vLLM environment (torch, transformers, gguf, accelerate). bfloat16 weights.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = sys.argv[1], sys.argv[2]
    folder, name = os.path.split(os.path.abspath(src))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The weights are dequantized on load; drop the GGUF marker so they save as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
