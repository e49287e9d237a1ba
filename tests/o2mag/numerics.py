"""Tolerances for comparing two float32 runs of the tiny pipeline that may take different float orders.

Two runs of the same pipeline on equal weights can still round differently: a BLAS picks its
kernels by CPU (Intel vs AMD) and by the operands' memory alignment (weights read back from a
safetensors file sit at other offsets than freshly allocated ones), and another batch size takes
other GEMM blockings. DDIM inversion, the denoising steps and AGO's Adam step (which normalises
the gradient, so a component at the rounding level can flip sign) then amplify that difference.

A bound that holds on every machine is the rounding error of the computation itself, measured on
the machine that runs the test: run the same pipeline in float64 (close to exact), take the float32
run's largest deviation ``e`` from it, and allow ``2 e``: each float32 run lies about ``e`` from the
exact result, so two of them differ by at most about the sum. Seen on the tiny pipeline (3 steps,
1 AGO step): ``e`` about 1.6e-4 on an Intel Xeon, while a relative 2**-23 perturbation of every UNet
output moves the images by about 1e-4, and an AMD EPYC's reloaded weights moved them by 7.5e-5.
"""
from __future__ import annotations

import numpy as np

FLOOR = 1e-6  # an image element in [0, 1]: far below one 8-bit grey level (3.9e-3)


def float_order_bound(fp32: np.ndarray, fp64: np.ndarray) -> float:
    """Largest difference two float32 runs of one computation may show: twice the float32 run's
    own rounding error against the float64 run, plus a floor."""
    fp32, fp64 = np.asarray(fp32, dtype=np.float64), np.asarray(fp64, dtype=np.float64)
    if fp32.shape != fp64.shape:
        raise ValueError(f"shapes differ: {fp32.shape} vs {fp64.shape}")
    return 2.0 * float(np.abs(fp32 - fp64).max()) + FLOOR
