"""edgelora: one quantized GGUF base model, LoRA adapters attached and detached while it runs."""

from .engine import Completion, Engine
from .errors import AdapterError, EdgeloraError, ModelError
from .session import Roles

__version__ = "0.1.0"
__all__ = ["Engine", "Roles", "Completion", "EdgeloraError", "AdapterError", "ModelError", "__version__"]
