"""The pipeline: :class:`O2MAGPipeline` (:mod:`.pipeline_o2mag`), input preparation (:mod:`.inputs`),
the inversion/AGO caches (:mod:`.caches`) and model loading (:mod:`.loading`).

Names load lazily, so importing a helper module of this package does not import diffusers.
"""
_LAZY = {
    "O2MAGPipeline": "o2mag.pipeline.pipeline_o2mag",
    "O2MAGPipelineOutput": "o2mag.pipeline.pipeline_o2mag",
    "PipelineStats": "o2mag.pipeline.pipeline_o2mag",
    "token_indices": "o2mag.pipeline.pipeline_o2mag",
}

__all__ = sorted(_LAZY)


from .._lazy import lazy_names  # noqa: E402

__getattr__, __dir__ = lazy_names("o2mag.pipeline", _LAZY, globals())
