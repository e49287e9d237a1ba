"""The downstream detector: a DRAEM-style discriminative segmentation U-Net and its training.

This is the model the anomaly-generation papers train on generated data to report detection
numbers: an encoder-decoder with skip connections, 3 input channels (the RGB image only), 2 output
channels (normal / anomalous logits), six levels of widths w, 2w, 4w, 8w, 8w, 8w (w = 64 in the
papers), trained with a focal loss (gamma = 2) and Adam.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import is_int

__all__ = ["SegmentationUNet", "focal_loss", "TrainConfig", "train_segmentation", "predict_maps"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationUNet(nn.Module):
    """U-Net, ``levels`` resolutions; input sides must be multiples of 2 ** (levels - 1)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_width: int = 64, levels: int = 6):
        super().__init__()
        for name, v, lo in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                            ("base_width", base_width, 1), ("levels", levels, 2)):
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        widths = [base_width * min(2 ** i, 8) for i in range(levels)]
        self.widths = widths
        self.down = nn.ModuleList([_block(in_channels, widths[0])] +
                                  [_block(widths[i - 1], widths[i]) for i in range(1, levels)])
        self.up_conv = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(levels - 1, 0, -1):
            self.up_conv.append(nn.Sequential(nn.Conv2d(widths[i], widths[i - 1], 3, padding=1),
                                              nn.BatchNorm2d(widths[i - 1]), nn.ReLU(inplace=True)))
            self.merge.append(_block(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(f"input sides must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up_conv, self.merge, reversed(skips[:-1])):
            x = up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
            x = merge(torch.cat([x, skip], dim=1))
        return self.head(x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss over pixels: -(1 - p_t) ** gamma * log p_t, p_t = softmax prob. of the true class.

    ``logits`` (B, 2, H, W); ``target`` (B, H, W) bool/0-1. Down-weights the many easy normal
    pixels, which otherwise swamp the few defect pixels.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.long()[:, None]).squeeze(1)
    return (-(1 - logp_t.exp()).pow(gamma) * logp_t).mean()


@dataclass
class TrainConfig:
    """Training schedule; the defaults are the papers' (AnomalyDiffusion-style) settings."""

    epochs: int = 200
    samples_per_epoch: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    milestones: tuple = (0.8, 0.9)  # fractions of the epochs where lr is multiplied by lr_gamma
    lr_gamma: float = 0.2
    normal_fraction: float = 0.5    # share of each batch taken from train/good (empty masks)
    real_fraction: float = 0.0      # share from real reference defects (0.1 in the O2MAG code)
    base_width: int = 64
    levels: int = 6
    seed: int = 0
    amp: bool = False               # float16 autocast + grad scaling (CUDA only)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _draw_batch(gen: torch.Generator, sizes: Dict[str, int], cfg: TrainConfig, n: int) -> Dict[str, torch.Tensor]:
    """Which pool (normal / real / synthetic) and which index each of ``n`` samples comes from."""
    u = torch.rand(n, generator=gen)
    real_cut = cfg.normal_fraction + (cfg.real_fraction if sizes.get("real", 0) else 0.0)
    pools = {"normal": u < cfg.normal_fraction,
             "real": (u >= cfg.normal_fraction) & (u < real_cut),
             "synthetic": u >= real_cut}
    return {k: torch.randint(0, sizes[k], (int(m.sum()),), generator=gen) if sizes.get(k, 0) and m.any()
            else torch.zeros(0, dtype=torch.long) for k, m in pools.items()}


def train_segmentation(pools: Dict[str, tuple], cfg: TrainConfig, device: torch.device, *,
                       progress: bool = False, desc: str = "train",
                       after_epoch: Optional[Callable[[int, nn.Module], None]] = None) -> tuple:
    """Train a fresh :class:`SegmentationUNet` on ``pools`` and return ``(model, history)``.

    ``pools``: ``{"normal": (images,), "synthetic": (images, masks), "real": (images, masks)}``
    with uint8 (N, 3, S, S) images and bool (N, S, S) masks; "real" may be missing. Every epoch
    draws ``samples_per_epoch`` samples with replacement (seeded) in the configured proportions.
    The model returned is the one after the last epoch. ``after_epoch(epoch, model)`` is called
    after each epoch (used only by the leaky protocol).
    """
    sizes = {k: v[0].shape[0] for k, v in pools.items()}
    if not sizes.get("normal") or not sizes.get("synthetic"):
        raise ValueError("pools needs non-empty 'normal' and 'synthetic' sets")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = SegmentationUNet(base_width=cfg.base_width, levels=cfg.levels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    marks = sorted({max(1, math.ceil(f * cfg.epochs)) for f in cfg.milestones if 0 < f < 1})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=cfg.lr_gamma)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(cfg.samples_per_epoch / cfg.batch_size)
    history: List[dict] = []
    bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        total, count = 0.0, 0
        for step in range(steps):
            n = min(cfg.batch_size, cfg.samples_per_epoch - step * cfg.batch_size)
            picks = _draw_batch(gen, sizes, cfg, n)
            imgs, masks = [], []
            for k, idx in picks.items():
                if len(idx) == 0:
                    continue
                imgs.append(pools[k][0][idx])
                masks.append(pools[k][1][idx] if k != "normal" else
                             torch.zeros(len(idx), *pools[k][0].shape[2:], dtype=torch.bool))
            x = torch.cat(imgs).to(device).float().div_(255)
            y = torch.cat(masks).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = focal_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * n
            count += n
            bar.update(1)
        sched.step()
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "lr": opt.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(count, 1):.4f}")
        if after_epoch is not None:
            after_epoch(epoch + 1, model)
    bar.close()
    return model, history


@torch.no_grad()
def predict_maps(model: nn.Module, images: torch.Tensor, device: torch.device, *, batch_size: int = 16,
                 amp: bool = False, progress: bool = False, desc: str = "predict") -> torch.Tensor:
    """Anomaly probability maps float32 (N, S, S) in [0, 1] for uint8 (N, 3, S, S) images."""
    was_training = model.training
    model.eval()
    out = torch.empty(images.shape[0], *images.shape[2:], dtype=torch.float32)
    use_amp = amp and device.type == "cuda"
    for s in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        x = images[s:s + batch_size].to(device).float().div_(255)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
        out[s:s + batch_size] = torch.softmax(logits.float(), dim=1)[:, 1].cpu()
    model.train(was_training)
    return out
