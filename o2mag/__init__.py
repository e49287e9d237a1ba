"""o2mag: training-free one-to-more anomaly generation (O2MAG, CVPR 2026) on diffusers."""
from ._version import __version__  # noqa: F401

# Public names load lazily so that `import o2mag` stays cheap: diffusers is imported only when a
# name that needs it is used.
_LAZY = {
    "GraftConfig": "o2mag.method.config",
    "BranchLayout": "o2mag.method.layout",
    "AttentionGraft": "o2mag.graft",
    "SourceCache": "o2mag.graft",
    "O2MAGPipeline": "o2mag.pipeline.pipeline_o2mag",
    "O2MAGPipelineOutput": "o2mag.pipeline.outputs",
    "PipelineStats": "o2mag.pipeline.outputs",
}

__all__ = sorted(_LAZY)


from ._lazy import lazy_names  # noqa: E402

__getattr__, __dir__ = lazy_names("o2mag", _LAZY, globals())
