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
    devices: tuple[Device, ...] = ()  # what layers can go to: CPU, plus any GPU the build sees

    @property
    def offload_devices(self) -> tuple[Device, ...]:
        """The devices n_gpu_layers puts layers on (not the CPU, not CPU-side accelerators)."""
        return tuple(d for d in self.devices if d.type in ("gpu", "igpu"))

    @property
    def build(self) -> str:
        """The build's accelerator: CUDA, Metal, Vulkan... or CPU."""
        gpu = [b for b in self.backends if b in GPU_BACKENDS]
        return "+".join(gpu) if gpu else "CPU"


def _libggml() -> ctypes.CDLL | None:
    """ggml's own library (it ships beside libllama in llama_cpp/lib)."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = lib_dir / name
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def _registered_backends() -> tuple[str, ...]:
    """Ask ggml's backend registry."""
    lib = _libggml()
    if lib is None:
        return ()
    try:
        lib.ggml_backend_reg_count.restype = ctypes.c_size_t
        lib.ggml_backend_reg_get.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_reg_name.restype = ctypes.c_char_p
        lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        return tuple(
            lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
            for i in range(lib.ggml_backend_reg_count())
        )
    except AttributeError:
        return ()


# enum ggml_backend_dev_type (ggml-backend.h)
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class Device:
    name: str  # e.g. "Vulkan0", "CUDA0", "CPU"
    description: str  # e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
    type: str  # cpu | gpu | igpu | accel
    memory_total: int  # bytes, as the device reports it

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "type": self.type,
                "memory_total_mib": self.memory_total >> 20}


def _registered_devices() -> tuple[Device, ...]:
    """ggml's device list: what llama.cpp can put layers on (a Vulkan build lists no device when
    the only Vulkan device is a CPU one, e.g. llvmpipe, unless GGML_VK_VISIBLE_DEVICES names it)."""
    lib = _libggml()
    if lib is None:
        return ()
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        size_p = ctypes.POINTER(ctypes.c_size_t)
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
        devices = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(Device(
                name=lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                description=lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                memory_total=total.value,
            ))
        return tuple(devices)
    except AttributeError:
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
        devices=_registered_devices(),
    )
