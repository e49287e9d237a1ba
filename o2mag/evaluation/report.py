"""Write evaluation results: ``results.json`` for programs, ``report.md`` (+ PNG plots) for people.

Plots use matplotlib (a dependency of o2mag); the example panels (image | ground truth |
predicted map) use Pillow only. The report states in its first lines whether the run was the
embedded demonstration and whether the leaky paper protocol was used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_write
from .metrics import METRIC_KEYS

__all__ = ["write_json", "write_detect_report", "write_classify_report", "METRIC_LABELS"]

METRIC_LABELS = {"auroc_i": "AUROC-I", "ap_i": "AP-I", "f1max_i": "F1max-I", "auroc_p": "AUROC-P",
                 "ap_p": "AP-P", "f1max_p": "F1max-P", "aupro": "AUPRO"}

DEMO_BANNER = ("> **Demonstration.** These numbers come from the embedded demo: a tiny MVTec-like dataset "
               "and synthetic tree drawn in code, a small U-Net and a short schedule. They show that the "
               "evaluation machinery works end to end; they say nothing about O2MAG or any generator.")
LEAKY_BANNER = ("> **LEAKY PROTOCOL.** Run with `--leaky-paper-protocol`: the checkpoint was chosen on the "
                "TEST set after every epoch, test masks were resized bilinearly and truncated (defect "
                "edges eroded) and pixel F1-max used a 0.05 threshold grid. This reproduces how published "
                "tables were computed so they can be compared; these numbers overstate what a detector "
                "trained on this data achieves on unseen images.")


def _public(obj):
    """Drop keys starting with '_' (in-memory extras such as example images) before JSON."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_json(path: Path, results: dict) -> None:
    atomic_write(path, (json.dumps(_public(results), indent=2, sort_keys=False, allow_nan=False) + "\n").encode(), make_parents=True)


def _pct(v: Optional[float]) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _table(rows: Dict[str, Dict[str, float]], mean: Dict[str, float]) -> List[str]:
    head = "| category | " + " | ".join(METRIC_LABELS[k] for k in METRIC_KEYS) + " |"
    lines = [head, "|---|" + "---|" * len(METRIC_KEYS)]
    for cat, m in rows.items():
        lines.append(f"| {cat} | " + " | ".join(_pct(m.get(k)) for k in METRIC_KEYS) + " |")
    if len(rows) > 1:
        lines.append("| **mean** | " + " | ".join(f"**{_pct(mean.get(k))}**" for k in METRIC_KEYS) + " |")
    return lines


def _pyplot():
    import matplotlib  # deferred: a report without plots is written where matplotlib cannot load

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: pyplot only after matplotlib.use picked the backend

    return plt


def _bar_plot(path: Path, rows: Dict[str, Dict[str, float]], title: str) -> None:
    plt = _pyplot()
    cats = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cats) + 3), 3.6))
    width = 0.8 / len(METRIC_KEYS)
    x = np.arange(len(cats))
    for i, k in enumerate(METRIC_KEYS):
        ax.bar(x + (i - len(METRIC_KEYS) / 2 + 0.5) * width, [100 * rows[c][k] for c in cats], width,
               label=METRIC_LABELS[k])
    ax.set_xticks(x, cats)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(ncol=len(METRIC_KEYS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _pr_plot(path: Path, curves: Dict[str, dict], title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, level in zip(axes, ("image", "pixel")):
        for cat, c in curves.items():
            ax.plot(c[level]["recall"], c[level]["precision"], label=cat)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{level}-level PR")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _heat(m: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a black-red-yellow-white ramp (no colormap library needed)."""
    v = np.clip(m, 0, 1)[..., None]
    ramp = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (ramp * 255).astype(np.uint8)


def _examples_panel(path: Path, examples: List[dict]) -> None:
    """Rows of [image | ground truth | predicted map], labelled with file name and image score."""
    if not examples:
        return
    s = examples[0]["image"].shape[0]
    tile = max(s, 96)
    pad, label_h = 4, 14
    w = 3 * tile + 4 * pad
    h = len(examples) * (tile + label_h + pad) + pad
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, ex in enumerate(examples):
        y = pad + r * (tile + label_h + pad)
        draw.text((pad, y), f"{ex['name']}  score {ex['score']:.3f}", fill=(0, 0, 0))
        gt = np.repeat((ex["mask"].astype(np.uint8) * 255)[..., None], 3, axis=-1)
        for c, arr in enumerate((ex["image"], gt, _heat(ex["map"]))):
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((tile, tile), Image.NEAREST)
            sheet.paste(im, (pad + c * (tile + pad), y + label_h))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def write_detect_report(out: Path, results: dict) -> Path:
    """``report.md`` with the banners, the metric table, split counts and the plots; returns its path."""
    cats = results["categories"]
    rows = {c: r["metrics"] for c, r in cats.items()}
    lines = ["# o2mag evaluate detect", ""]
    if results.get("demo"):
        lines += [DEMO_BANNER, ""]
    if results.get("leaky"):
        lines += [LEAKY_BANNER, ""]
    s = results["settings"]
    lines += [f"Protocol: **{results['protocol']}**. Model: segmentation U-Net (base width {s['train']['base_width']}), "
              f"{s['train']['epochs']} epochs x {s['train']['samples_per_epoch']} samples, batch "
              f"{s['train']['batch_size']}, {s['size']} px, seed {s['train']['seed']}, device {s['device']}"
              f"{', AMP' if s['train']['amp'] else ''}. Checkpoint: "
              f"{'chosen on the TEST set (leaky)' if results.get('leaky') else 'the final one'}.", "",
              f"MVTec root: `{s['mvtec_root']}`; synthetic tree: `{s['synthetic_root']}`"
              f"{'; real reference defects mixed into training' if s['real_refs'] else ''}.", "",
              "## Metrics (%)", ""]
    lines += _table(rows, results.get("mean", {}))
    lines += ["", "Image score: max of the 21x21 average-pooled anomaly map. Pixel metrics pool every test "
              "pixel of a category. AUPRO: integrated to FPR 0.3, normalised. F1-max: "
              + ("0.05 threshold grid (pixel, leaky)." if results.get("leaky") else "exact, over the full PR curve."),
              "", "## Data", "", "| category | train/good | synthetic (per defect) | test images (per defect) | "
              "held-back references |", "|---|---|---|---|---|"]
    for c, r in cats.items():
        sp = r["split"]
        lines.append(f"| {c} | {sp['train_good']} | "
                     + ", ".join(f"{d} {n}" + (f" ({r.get('synthetic_rejected', {}).get(d)} rejected left out)"
                                              if r.get("synthetic_rejected", {}).get(d) else "")
                                 for d, n in r["synthetic"].items()) + " | "
                     + ", ".join(f"{d} {n}" for d, n in sp["test"].items()) + " | "
                     + ", ".join(f"{d} {n}" for d, n in sp["references"].items())
                     + (f" (+{len(sp['excluded_by_manifest'])} named in manifests)" if sp["excluded_by_manifest"] else "")
                     + " |")
    plots = []
    title = ("LEAKY paper protocol — " if results.get("leaky") else "") + ("demo — " if results.get("demo") else "")
    try:
        _bar_plot(out / "per_category.png", rows, f"{title}detection metrics per category")
        _pr_plot(out / "pr_curves.png", {c: r["curves"] for c, r in cats.items()}, f"{title}precision-recall")
        plots = ["per_category.png", "pr_curves.png"]
    except ImportError as e:
        lines += ["", f"(Plots skipped: matplotlib cannot be imported: {e}.)"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    example_files = []
    for c, r in cats.items():
        if r.get("_examples"):
            name = f"{c}/examples.png"
            _examples_panel(out / name, r["_examples"])
            example_files.append((c, name))
    if example_files:
        lines += ["", "## Predicted maps", "", "Each row: test image | ground truth | predicted anomaly map.", ""]
        for c, name in example_files:
            lines += [f"### {c}", "", f"![{c} examples]({name})", ""]
    path = out / "report.md"
    atomic_write(path, ("\n".join(lines).rstrip() + "\n").encode(), make_parents=True)
    return path


def write_classify_report(out: Path, results: dict) -> Path:
    """``report.md`` for defect-type classification: accuracy table and confusion matrices."""
    lines = ["# o2mag evaluate classify", ""]
    if results.get("demo_backbone"):
        lines += ["> **Demonstration backbone.** `--backbone tiny` is a small randomly initialised CNN, not the "
                  "papers' ImageNet ResNet-34: the accuracy shows the machinery only.", ""]
    lines += ["| category | accuracy (%) | test images | classes |", "|---|---|---|---|"]
    for c, r in results["categories"].items():
        lines.append(f"| {c} | {_pct(r['accuracy'])} | {r['n_test']} | {', '.join(r['classes'])} |")
    if len(results["categories"]) > 1:
        lines.append(f"| **mean** | **{_pct(results['mean_accuracy'])}** | | |")
    for c, r in results["categories"].items():
        lines += ["", f"## {c}: confusion matrix (rows = true, columns = predicted)", "",
                  "| | " + " | ".join(r["classes"]) + " | per-class acc. |",
                  "|---|" + "---|" * (len(r["classes"]) + 1)]
        for name, row, acc in zip(r["classes"], r["confusion"], r["per_class_accuracy"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {_pct(acc)} |")
    path = out / "report.md"
    atomic_write(path, ("\n".join(lines).rstrip() + "\n").encode(), make_parents=True)
    return path
