"""o2mag_kernels: masked tri-source attention, the op behind attention grafting.

Knows nothing of diffusers: it runs wherever torch (and, for the fused kernel, triton) is installed.
The op's contract is written out in docs/architecture.md of the source repository.
"""
from .validation import BACKENDS
from .api import available_backends, tri_source_attention
from .mask import TriSourceMask, tri_source_mask

__all__ = ["tri_source_attention", "tri_source_mask", "TriSourceMask", "available_backends", "BACKENDS"]
__version__ = "0.2.0"
