"""Evaluation of generated anomalies: the papers' metrics, computed honestly.

- :func:`detection_metrics` (contract): AUROC / AP / F1-max at image and pixel level and AUPRO.
- :func:`kid`, :func:`ic_lpips`: image quality with any feature extractor / distance network.
- ``o2mag evaluate detect | classify | quality``: the downstream protocols on your data
  (:mod:`o2mag.commands.evaluate`).

Names load lazily so that ``import o2mag.evaluation`` stays cheap.
"""

_LAZY = {
    "detection_metrics": "o2mag.evaluation.metrics",
    "METRIC_KEYS": "o2mag.evaluation.metrics",
    "aupro": "o2mag.evaluation.metrics",
    "f1_max": "o2mag.evaluation.metrics",
    "auroc": "o2mag.evaluation.metrics",
    "average_precision": "o2mag.evaluation.metrics",
    "precision_recall": "o2mag.evaluation.metrics",
    "pro_curve": "o2mag.evaluation.metrics",
    "image_scores_from_maps": "o2mag.evaluation.metrics",
    "kid": "o2mag.evaluation.quality",
    "ic_lpips": "o2mag.evaluation.quality",
    "extract_features": "o2mag.evaluation.quality",
    "SegmentationUNet": "o2mag.evaluation.segmentation",
    "make_demo_data": "o2mag.evaluation.demo",
}

__all__ = sorted(_LAZY)


from .._lazy import lazy_names  # noqa: E402

__getattr__, __dir__ = lazy_names("o2mag.evaluation", _LAZY, globals())
