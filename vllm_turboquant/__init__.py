"""vllm-turboquant: TurboQuant KV-cache compression for vLLM.

The top level exports the seed library's API and the core pieces; importing it
does not import vLLM (the vLLM plugin registers itself through an entry point).
``vllm_turboquant.calibrate`` is the calibration module (``python -m vllm_turboquant.calibrate``);
the fit itself is ``vllm_turboquant.registry.calibrate``.
"""

from .codebook import Codebook, build_lloyd_max_codebook, get_codebook
from .layout import SlotLayout, slot_layout
from .memory import MemoryEstimate, estimate_memory
from .presets import PRESETS, Preset, get_preset, preset_names
from .registry import CalibrationError, CodebookRegistry, LayerTables, load_registry
from .seed_api import (
    TurboQuantCompressorMSE,
    TurboQuantCompressorV2,
    TurboQuantKVCache,
    TurboQuantMSE,
    TurboQuantProd,
)

__version__ = "0.1.0"

__all__ = [
    "Codebook", "build_lloyd_max_codebook", "get_codebook", "SlotLayout", "slot_layout",
    "MemoryEstimate", "estimate_memory", "PRESETS", "Preset", "get_preset", "preset_names",
    "CalibrationError", "CodebookRegistry", "LayerTables", "load_registry",
    "TurboQuantCompressorMSE", "TurboQuantCompressorV2", "TurboQuantKVCache", "TurboQuantMSE",
    "TurboQuantProd",
]
