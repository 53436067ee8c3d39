"""OLMo 2 and OLMo 3 (sliding-window layers): the Llama family's places, norms after attention and MLP (not before), RMSNorm on queries and keys.

The norms multiply by their weight before rounding (``nn.norm.WEIGHT_FIRST_RMS_NORMS``); the rest is Llama's.
"""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

OLMO2 = register_family(replace(LLAMA, name="OLMo 2", model_types=("olmo2",)))
OLMO3 = register_family(replace(OLMO2, name="OLMo 3", model_types=("olmo3",)))
