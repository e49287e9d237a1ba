"""The backends of :func:`o2mag_kernels.tri_source_attention`: ``reference`` (the literal
formula), ``torch`` (routed / compacted SDPA) and ``triton`` (the fused kernel of
``triton_kernel.py``, launched by ``triton_backend.py``)."""
