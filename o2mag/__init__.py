"""o2mag: training-free one-to-more anomaly generation (O2MAG, CVPR 2026) on diffusers."""
__version__ = "0.1.0"
