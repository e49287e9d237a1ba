"""o2mag: training-free one-to-more anomaly generation (O2MAG, CVPR 2026) on diffusers."""
__version__ = "0.1.0"

# Public names load lazily so that `import o2mag` stays cheap: diffusers is imported only when a
# name that needs it is used.
_LAZY = {
    "GraftConfig": "o2mag.config",
    "BranchLayout": "o2mag.layout",
    "AttentionGraft": "o2mag.graft",
    "SourceCache": "o2mag.graft",
    "O2MAGPipeline": "o2mag.pipeline",
    "O2MAGPipelineOutput": "o2mag.pipeline",
    "PipelineStats": "o2mag.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'o2mag' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
