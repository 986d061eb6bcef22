"""Typed errors. Every message names the file, key or flag and the problem, in one line."""


class EdgeloraError(Exception):
    """A problem the user can fix (bad file, bad flag, missing model). The CLI prints it and exits 2."""


class ModelError(EdgeloraError):
    """The base model cannot be found or loaded."""


class AdapterError(EdgeloraError):
    """An adapter file was refused; the engine and its other adapters are untouched."""


class NotGGUFError(AdapterError):
    """The file is not a readable GGUF."""


class NotLoraAdapterError(AdapterError):
    """The GGUF is not a LoRA adapter (general.type / adapter.type)."""


class ArchitectureMismatchError(AdapterError):
    """The adapter was made for another architecture than the loaded base."""


class TensorMismatchError(AdapterError):
    """Unpaired lora_a/lora_b, or a tensor the base does not have."""


class ShapeMismatchError(AdapterError):
    """Adapter tensor shapes disagree with each other or with the base."""


class NonFiniteError(AdapterError):
    """The adapter holds NaN or Inf values."""


class UnknownAdapterError(EdgeloraError):
    """A name that is not attached or resident."""


class EngineBusyError(EdgeloraError):
    """The calling thread holds an open stream: finish or close it before switching or generating again."""
