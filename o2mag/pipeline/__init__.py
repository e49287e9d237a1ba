"""The pipeline: :class:`O2MAGPipeline` (:mod:`.pipeline_o2mag`) and its pieces -- the generation
keywords (:mod:`.settings`), checking and reading a request (:mod:`.request`, :mod:`.inputs`),
encoding, inversion and AGO (:mod:`.preparation`) with their caches (:mod:`.caches`), the batches
and the denoising loop (:mod:`.denoise`), the outputs (:mod:`.outputs`), model loading
(:mod:`.loading`).

Names load lazily, so importing a helper module of this package does not import diffusers.
"""
_LAZY = {
    "O2MAGPipeline": "o2mag.pipeline.pipeline_o2mag",
    "O2MAGPipelineOutput": "o2mag.pipeline.outputs",
    "PipelineStats": "o2mag.pipeline.outputs",
    "GenerationSettings": "o2mag.pipeline.settings",
    "token_indices": "o2mag.pipeline.inputs",
}

__all__ = sorted(_LAZY)


from .._lazy import lazy_names  # noqa: E402

__getattr__, __dir__ = lazy_names("o2mag.pipeline", _LAZY, globals())
