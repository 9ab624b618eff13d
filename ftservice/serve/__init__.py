"""Serving: one base model, many adapters, an OpenAI-compatible API on Ray Serve."""
