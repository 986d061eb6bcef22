"""edgelora: one quantized GGUF base model, LoRA adapters attached and detached while it runs."""

import os

# OpenMP reads this once, when llama.cpp's CPU library loads (on the import below): passive waiting
# keeps generation fast on a busy machine (README 'Threads'). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from .engine import Completion, Engine
from .errors import AdapterError, EdgeloraError, ModelError
from .session import Roles

__version__ = "0.1.0"
__all__ = ["Engine", "Roles", "Completion", "EdgeloraError", "AdapterError", "ModelError", "__version__"]
