"""PEFT LoRA -> GGUF LoRA adapter converter.

Stands alone: imports numpy, safetensors and gguf only — never torch, never the edgelora runtime.
"""

__version__ = "0.1.0"

from .converter import OUTTYPES, ConversionPlan, convert_peft, plan_conversion, write_plan  # noqa: E402
from .errors import ConvertError  # noqa: E402

__all__ = ["convert_peft", "plan_conversion", "write_plan", "ConversionPlan", "ConvertError", "OUTTYPES"]
