"""o2mag_kernels: masked tri-source attention, the op behind attention grafting.

Knows nothing of diffusers: it runs wherever torch (and, for the fused kernel, triton) is installed.
"""
from .api import available_backends, tri_source_attention

__all__ = ["tri_source_attention", "available_backends"]
__version__ = "0.1.0"
