"""Where a loaded model's layers went, as llama.cpp reported it while loading.

llama.cpp decides the placement itself (a layer count is a request, not a promise: a CPU-only
build offloads nothing, a device that is not visible is not used) and says what it did only in
its load log:

    llama_model_load_from_file_impl: using device Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)) (unknown id) - 0 MiB free
    load_tensors: offloaded 31/31 layers to GPU
    load_tensors:      Vulkan0 model buffer size =   103.43 MiB

So the engine captures that log (native_log.capture) and this module reads it; what doctor, the
TUI's status bar and ``ask --json`` report is what llama.cpp did, not what was asked for."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "using device NAME (DESCRIPTION) (DEVICE ID) - N MiB free"; a description may hold parentheses.
_USING = re.compile(r": using device (\S+) \((.*)\) \([^()]*\) - \d+ MiB free")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"^\S+:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True)
class Offload:
    layers: int = 0  # layers llama.cpp put on a device (the output layer counts as one)
    of: int = 0  # layers the model has, by llama.cpp's count (blocks + output)
    devices: tuple[tuple[str, str], ...] = ()  # (name, description) llama.cpp said it uses
    buffers_mib: dict[str, float] = field(default_factory=dict)  # model weights per buffer type
    reported: bool = False  # llama.cpp logged a layer count (it does whenever a GPU device can be used)

    @property
    def on_device(self) -> bool:
        return self.layers > 0 and bool(self.devices)

    @property
    def label(self) -> str:
        """'CPU', or e.g. 'Vulkan0 (llvmpipe): 31/31 layers'."""
        if not self.on_device:
            return "CPU"
        names = ", ".join(f"{name} ({_short(desc)})" for name, desc in self.devices)
        return f"{names}: {self.layers}/{self.of} layers"

    def as_dict(self) -> dict:
        return {
            "device": self.label,
            "devices": [{"name": n, "description": d} for n, d in self.devices],
            "layers_offloaded": self.layers,
            "layers": self.of,
            "model_buffers_mib": dict(self.buffers_mib),
        }


def _short(description: str) -> str:
    """'llvmpipe (LLVM 15.0.6, 256 bits)' -> 'llvmpipe'; 'NVIDIA H200' stays."""
    return description.split(" (", 1)[0].strip() or description


def parse(lines: list[str]) -> Offload:
    """Read a model load's log (lines as llama.cpp logged them, possibly in pieces)."""
    text = "".join(lines).splitlines()
    devices: list[tuple[str, str]] = []
    layers = of = 0
    reported = False
    buffers: dict[str, float] = {}
    for line in text:
        if m := _USING.search(line):
            devices.append((m.group(1), m.group(2)))
        elif m := _OFFLOADED.search(line):
            layers, of, reported = int(m.group(1)), int(m.group(2)), True
        elif m := _BUFFER.search(line):
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    return Offload(layers, of, tuple(devices), buffers, reported)
