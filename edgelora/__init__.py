"""edgelora: one quantized GGUF base model, LoRA adapters attached and detached while it runs."""

import os

# OpenMP reads these once, when llama.cpp's CPU library loads (the import below). Its default
# busy-waiting collapses generation when other programs want the cores (0.2 tok/s measured), and
# passive waiting loses 3x when idle; a short spin holds up both ways (README 'Threads').
# A wait policy or spin count the user set wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
# numpy's BLAS works on small matrices here (routing embeddings); its thread pool only contends with
# llama.cpp's threads and spins under load (measured: 9 ms per embedding with 1 thread, 16 with 2).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from edgelora.runtime.engine import Completion, Engine
from edgelora.errors import AdapterError, EdgeloraError, ModelError
from edgelora.roles.session import Roles

__version__ = "0.1.0"
__all__ = ["Engine", "Roles", "Completion", "EdgeloraError", "AdapterError", "ModelError", "__version__"]
