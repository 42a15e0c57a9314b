"""vergeai: a self-hosted, OpenAI-compatible API for local GGUF models."""

__version__ = "0.1.0"
