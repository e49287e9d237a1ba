"""Pretrained networks for evaluation, loaded from local files only, plus tiny stand-ins.

The papers' numbers need ImageNet/Inception weights: the FID Inception of torch-fidelity (KID),
AlexNet or VGG-16 under torchmetrics' LPIPS heads (IC-LPIPS), ResNet-34 (classification). They are
never downloaded here: each loader looks for the weight file in torch's hub cache
(``$TORCH_HOME/hub/checkpoints``, where torchvision and torch-fidelity put their downloads) or at a
path the user gives, and stops with a one-line ``InputError`` naming the file when it is missing,
before importing the optional packages (torchvision, torch-fidelity: ``pip install 'o2mag[eval]'``).

The ``tiny_*`` networks are small, randomly initialised from a fixed seed, and need nothing: they
let the commands and tests run offline. Their numbers demonstrate the machinery and mean nothing
about image quality.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import InputError, MissingInputError

__all__ = ["WEIGHT_FILES", "weights_file", "inception_extractor", "lpips_distance", "resnet34_classifier",
           "tiny_feature_extractor", "tiny_distance", "tiny_classifier", "EXTRA_HINT"]

EXTRA_HINT = ("pip install 'o2mag[eval]' (torchvision and torch-fidelity; install the torchvision build "
              "that matches your torch first)")

# file names torchvision / torch-fidelity give these weights in torch's hub cache
WEIGHT_FILES = {
    "inception": "weights-inception-2015-12-05-6726825d.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "resnet34": "resnet34-b627a593.pth",
}


def weights_file(kind: str, path: Optional[str | os.PathLike] = None) -> Path:
    """The local weight file for ``kind`` (a key of ``WEIGHT_FILES``): ``path`` if given, else the
    file in torch's hub cache. Missing -> ``MissingInputError`` saying where it was looked for."""
    if kind not in WEIGHT_FILES:
        raise ValueError(f"kind must be one of {', '.join(WEIGHT_FILES)}, got {kind!r}")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MissingInputError(f"{kind} weights file not found: {p}")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILES[kind]
    if not p.is_file():
        raise MissingInputError(
            f"{kind} weights not found at {p} (nothing is downloaded): copy {WEIGHT_FILES[kind]} into "
            f"{p.parent} (set TORCH_HOME to use another cache) or pass the file's path")
    return p


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{module} is needed for this network but cannot be imported ({e}); {EXTRA_HINT}") \
            from None


def _state_dict(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"cannot read weights {path}: {e}") from None
    if not isinstance(sd, dict):
        raise InputError(f"weights {path} do not hold a state dict")
    return sd


def inception_extractor(weights: Optional[str | os.PathLike] = None) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (2048-d pool features); takes uint8 (B, 3, H, W) images."""
    path = weights_file("inception", weights)
    fe = _optional("torch_fidelity.feature_extractor_inceptionv3")
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return net.eval()


def lpips_distance(net: str = "alex", weights: Optional[str | os.PathLike] = None) -> nn.Module:
    """LPIPS (torchmetrics' implementation and linear heads) on an ImageNet AlexNet or VGG-16.

    Returns a module ``d(x, y)`` for two (B, 3, H, W) batches in [-1, 1] -> (B,) distances.
    """
    if net not in ("alex", "vgg"):
        raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
    path = weights_file(net, weights)
    tv_models = _optional("torchvision.models")
    lp = _optional("torchmetrics.functional.image.lpips")
    backbone = (tv_models.alexnet if net == "alex" else tv_models.vgg16)(weights=None)
    backbone.load_state_dict(_state_dict(path))
    model = lp._LPIPS(pretrained=True, net=net, pnet_rand=True)  # heads shipped with torchmetrics
    for sl in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name, layer in sl.named_children():
            layer.load_state_dict(backbone.features[int(name)].state_dict())
    return _LPIPSDistance(model.eval())


class _LPIPSDistance(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).reshape(-1)


def resnet34_classifier(num_classes: int, weights: Optional[str | os.PathLike] = None) -> nn.Module:
    """torchvision ResNet-34 with ImageNet weights and a new ``num_classes`` head."""
    path = weights_file("resnet34", weights)
    tv_models = _optional("torchvision.models")
    model = tv_models.resnet34(weights=None)
    model.load_state_dict(_state_dict(path))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


# ------------------------------------------------------------------------------------ tiny stand-ins


def _tiny_convs(seed: int, width: int = 16) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.zero_()
    return net.eval()


class _TinyFeatures(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.body = _tiny_convs(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float()).mean(dim=(2, 3))


class _TinyDistance(nn.Module):
    """LPIPS-shaped: unit-normalised channel features, squared difference, spatial mean."""

    def __init__(self, seed: int):
        super().__init__()
        self.body = _tiny_convs(seed)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.body(x.float()), self.body(y.float())
        fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        return ((fx - fy) ** 2).sum(dim=1).mean(dim=(1, 2))


def tiny_feature_extractor(seed: int = 0) -> nn.Module:
    """Random small CNN -> 64-d features of float images in [0, 1] (demonstration only)."""
    return _TinyFeatures(seed)


def tiny_distance(seed: int = 0) -> nn.Module:
    """Random small CNN distance of two [-1, 1] batches (demonstration only)."""
    return _TinyDistance(seed)


def tiny_classifier(num_classes: int, seed: int = 0, width: int = 16) -> nn.Module:
    """Small CNN classifier (for tests and offline runs; not the papers' ResNet-34)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
        )
