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


class ContextLengthError(EdgeloraError):
    """The prompt does not fit the context (the server's code context_length_exceeded)."""


class SamplingError(EdgeloraError):
    """A sampling value outside the one sampling table (runtime/sampling.py); ``key`` names it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ConfigError(EdgeloraError):
    """The user's config file: bad TOML, an unknown key, a wrong type."""


class RoleError(EdgeloraError):
    """A manifest or role reference that cannot be used."""


class UnknownRoleError(RoleError):
    """A role name no manifest defines (the server's 404, and where its fallback role applies)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class SelectionError(RoleError):
    """A role selection ('a:0.7+b', 'auto', './x.toml') that breaks the grammar of roles/selection.py."""


class HistoryError(EdgeloraError):
    """The conversation store cannot be read or written."""


class ExportError(EdgeloraError):
    """`edgelora export` refused a role or a target folder."""
