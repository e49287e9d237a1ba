"""Defect-type classification: trained on generated images, tested on real defects.

Per category: a classifier over the defect types present both in the synthetic tree and in the
MVTec test folders, trained on at most ``max_per_defect`` generated images per type, tested on the
real defect images without the held-back reference third. The model after the last epoch is
used. Reported: accuracy, per-class accuracy and the confusion matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..files import atomic_write
from .data import load_images, mvtec_split, synthetic_samples

__all__ = ["ClassifyOptions", "classify_category", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifyOptions:
    mvtec_root: Path
    synthetic_root: Path
    out: Path
    model_factory: Callable[[int], nn.Module]
    size: int = 256
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    max_per_defect: Optional[int] = 500
    seed: int = 0
    device: torch.device = torch.device("cpu")
    amp: bool = False
    progress: bool = True


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float().div(255) - mean) / std


def classify_category(category: str, opts: ClassifyOptions) -> dict:
    """Train and test one category's defect-type classifier; returns its result record."""
    t0 = time.perf_counter()
    synth = synthetic_samples(opts.synthetic_root, category, opts.max_per_defect)
    split = mvtec_split(opts.mvtec_root, category, synth.references)
    real_types = sorted({it.defect for it in split.test if it.defect != "good"})
    classes = [d for d in sorted(synth.pairs) if d in real_types]
    if len(classes) < 2:
        raise InputError(f"{category}: classification needs at least 2 defect types present both in the "
                         f"synthetic tree ({', '.join(sorted(synth.pairs))}) and in the test split "
                         f"({', '.join(real_types) or 'none'})")
    train_paths, train_labels = [], []
    for k, d in enumerate(classes):
        train_paths += [img for img, _ in synth.pairs[d]]
        train_labels += [k] * len(synth.pairs[d])
    test_items = [it for it in split.test if it.defect in classes]
    x_train = load_images(train_paths, opts.size, progress=opts.progress, desc=f"{category}: synthetic")
    y_train = torch.tensor(train_labels)
    x_test = load_images([it.image for it in test_items], opts.size, progress=opts.progress,
                         desc=f"{category}: test")
    y_test = np.array([classes.index(it.defect) for it in test_items])

    with torch.random.fork_rng(devices=[opts.device] if opts.device.type == "cuda" else []):
        torch.manual_seed(opts.seed)
        model = opts.model_factory(len(classes)).to(opts.device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    use_amp = opts.amp and opts.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(opts.seed)
    n = x_train.shape[0]
    steps = -(-n // opts.batch_size)
    history = []
    bar = tqdm(total=opts.epochs * steps, desc=f"{category}: train", disable=not opts.progress, leave=False)
    for epoch in range(opts.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, opts.batch_size):
            idx = perm[s:s + opts.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single image
                continue
            x = _normalise(x_train[idx].to(opts.device))
            with torch.autocast(device_type=opts.device.type, dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(model(x).float(), y_train[idx].to(opts.device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(idx)
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": total / n})
    bar.close()
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, x_test.shape[0], opts.batch_size):
            x = _normalise(x_test[s:s + opts.batch_size].to(opts.device))
            with torch.autocast(device_type=opts.device.type, dtype=torch.float16, enabled=use_amp):
                preds.append(model(x).float().argmax(dim=1).cpu())
    pred = torch.cat(preds).numpy()
    k = len(classes)
    confusion = np.bincount(y_test * k + pred, minlength=k * k).reshape(k, k)
    per_class = [float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None for i in range(k)]
    ckpt = opts.out / category / "classifier_final.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": model.state_dict(), "classes": classes, "size": opts.size}
    atomic_write(ckpt, lambda f: torch.save(state, f))
    return {"accuracy": float((pred == y_test).mean()), "classes": classes, "confusion": confusion.tolist(),
            "per_class_accuracy": per_class, "n_train": {d: len(synth.pairs[d]) for d in classes},
            "synthetic_rejected": dict(synth.rejected),
            "n_test": int(len(y_test)), "split": split.counts(), "history": history, "checkpoint": str(ckpt),
            "seconds": time.perf_counter() - t0}
