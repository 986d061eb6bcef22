"""Bundled roles (manifests, GGUF adapters, PEFT sources), installed as edgelora.bundled."""
