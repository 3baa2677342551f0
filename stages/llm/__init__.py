"""LLM stage: llama-cpp-python in-process engine, OpenAI-compatible service and client."""
