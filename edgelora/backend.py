"""What the installed llama.cpp build can do: its backends and whether it can offload layers to a GPU."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "HIP", "SYCL", "OpenCL", "MUSA", "CANN")


@dataclass(frozen=True)
class BackendInfo:
    llama_cpp_python: str
    backends: tuple[str, ...]  # ggml backends registered in this build, e.g. ("CPU",) or ("CUDA", "CPU")
    gpu_offload: bool
    system_info: str

    @property
    def build(self) -> str:
        """The build's accelerator: CUDA, Metal, Vulkan... or CPU."""
        gpu = [b for b in self.backends if b in GPU_BACKENDS]
        return "+".join(gpu) if gpu else "CPU"


def _registered_backends() -> tuple[str, ...]:
    """Ask ggml's backend registry (libggml ships beside libllama in llama_cpp/lib)."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = lib_dir / name
        if path.exists():
            break
    else:
        return ()
    try:
        lib = ctypes.CDLL(str(path))
        lib.ggml_backend_reg_count.restype = ctypes.c_size_t
        lib.ggml_backend_reg_get.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_reg_name.restype = ctypes.c_char_p
        lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        return tuple(
            lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
            for i in range(lib.ggml_backend_reg_count())
        )
    except (OSError, AttributeError):
        return ()


@functools.cache  # the build does not change while the process runs; the TUI asks on every refresh
def backend_info() -> BackendInfo:
    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    backends = _registered_backends()
    if not backends:  # fall back to the names llama.cpp prints in its system info
        backends = tuple(b for b in GPU_BACKENDS if f"{b} :" in system or f"{b.upper()} :" in system) + ("CPU",)
    return BackendInfo(
        llama_cpp_python=importlib.metadata.version("llama-cpp-python"),
        backends=backends,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        system_info=system,
    )
