"""Engines: the engine contract and its adapters (the twin, vLLM)."""
