"""PEFT LoRA -> GGUF adapter converter. Imports only numpy, safetensors and gguf."""
