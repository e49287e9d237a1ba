"""Seconds per sample of ``o2mag dataset`` against ``o2mag generate`` on the same single job.

``python -m benchmarks.o2mag.dataset_vs_generate [--num 64 --steps 50 --ago-steps 500 ...]``

Both commands run as the user runs them (separate processes, model loaded from a folder) on one
reference defect, its mask and one normal image (the embedded sample), with the same model,
steps, AGO, batch size and seed. One untimed run of each fills a shared AGO/inversion cache
(AGO's CUDA backward is not bitwise repeatable, so sharing it is what makes the images
comparable) and warms the kernels; then each runs, alternating, for --num and for twice that
into fresh output folders: the difference is the seconds per sample without a run's fixed cost
(imports, model load, cache reads), which is reported apart; the outputs are compared. On a GPU the model is a random-weight SD v1.5-shaped pipeline in
fp16 at 512 px (weights do not change speed), on a CPU the tiny seeded model. The two commands
share the code path after the job is planned, so their times should agree within noise; the
result (JSON) says by how much they differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from o2mag.sources.sample import embedded_sample

from ..measure import device_name


def _model_folder(root: Path, device: torch.device) -> tuple:
    """A saved pipeline folder and the size/dtype to run it at."""
    from o2mag import O2MAGPipeline

    folder = root / "model"
    if device.type == "cuda":
        from .e2e import sd15_shaped_pipeline

        pipe = sd15_shaped_pipeline(torch.device("cpu"), dtype=torch.float32)
        size, dtype = 512, "fp16"
    else:
        pipe = O2MAGPipeline.tiny(0)
        size, dtype = pipe.default_size, "fp32"
    pipe.save_pretrained(folder)
    return folder, size, dtype


def _inputs(root: Path, size: int) -> dict:
    sample = embedded_sample(size=size)
    paths = {"ref": root / "ref.png", "mask": root / "ref_mask.png", "normal": root / "normal.png"}
    sample.reference.save(paths["ref"])
    Image.fromarray(np.asarray(sample.ref_mask, dtype=np.uint8) * 255).save(paths["mask"])
    sample.normal.save(paths["normal"])
    job = {"groups": [{"category": "sample", "defect": sample.anomaly_word,
                       "references": [{"image": str(paths["ref"]), "mask": str(paths["mask"])}],
                       "normals": [str(paths["normal"])], "prompt": sample.prompt,
                       "anomaly_word": sample.anomaly_word}]}
    paths["job"] = root / "one.json"
    paths["job"].write_text(json.dumps(job))
    return dict(paths, prompt=sample.prompt, word=sample.anomaly_word, defect=sample.anomaly_word)


def _run(cmd) -> tuple:
    """(wall seconds, the command's last output line: its summary)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("o2mag:")]
    summary = [ln for ln in lines if "per sample" in ln] or lines[-1:]
    return seconds, (summary[0] if summary else "")


def _images(folder: Path) -> list:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def run(device: torch.device, *, num: int, steps: int, ago_steps: int, batch_size: int,
        work: Path) -> dict:
    folder, size, dtype = _model_folder(work, device)
    inp = _inputs(work, size)
    common = ["--model", str(folder), "--device", str(device), "--dtype", dtype, "--size", str(size),
              "--steps", str(steps), "--ago-steps", str(ago_steps),
              "--batch-size", str(batch_size), "--seed", "0", "--quiet"]
    o2mag = [sys.executable, "-m", "o2mag"]
    generate = o2mag + ["generate", "--ref", str(inp["ref"]), "--ref-mask", str(inp["mask"]),
                        "--normal", str(inp["normal"]), "--prompt", inp["prompt"],
                        "--anomaly-word", inp["word"], "--category", "sample", "--defect",
                        inp["defect"]]
    dataset = o2mag + ["dataset", "--job", str(inp["job"])]
    seconds, images, logs = {}, {}, {}
    cache = ["--cache-dir", str(work / "cache")]  # one AGO/inversion cache for every run
    for name, cmd in (("generate", generate), ("dataset", dataset)):  # warm-up, untimed: fills
        _run(cmd + common + cache + ["--num", "1", "--out", str(work / f"warm-{name}")])  # caches
    for n in (num, 2 * num):  # alternating, so drift hits both commands alike
        for name, cmd in (("generate", generate), ("dataset", dataset)):
            out = work / f"{name}-{n}"
            seconds[(name, n)], logs[(name, n)] = _run(cmd + common + cache +
                                                       ["--num", str(n), "--out", str(out)])
    for name in ("generate", "dataset"):
        images[name] = _images(work / f"{name}-{2 * num}" / "sample" / inp["defect"] / "image")
    result = {"device": device_name(device), "torch": torch.__version__, "num": [num, 2 * num],
              "steps": steps, "ago_steps": ago_steps, "batch_size": batch_size, "size": size,
              "dtype": dtype}
    for name in ("generate", "dataset"):
        t1, t2 = seconds[(name, num)], seconds[(name, 2 * num)]
        marginal = (t2 - t1) / num  # per sample, without the fixed cost of a run
        result[name] = {"seconds": [t1, t2], "seconds_per_sample": marginal,
                        "fixed_seconds": t1 - num * marginal,
                        "summary": [logs[(name, num)], logs[(name, 2 * num)]]}
    result["dataset_over_generate_per_sample"] = (result["dataset"]["seconds_per_sample"]
                                                  / result["generate"]["seconds_per_sample"])
    a, b = images["generate"], images["dataset"]
    result["identical_images"] = len(a) == len(b) == 2 * num and all(
        np.array_equal(x, y) for x, y in zip(a, b))
    result["max_pixel_difference"] = max((int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b)),
                                         default=None)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.o2mag.dataset_vs_generate",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ago-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    args = p.parse_args(argv)
    for name in ("num", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ago_steps < 0:
        p.error("--ago-steps must be at least 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="o2mag-dvg-") as tmp:
        result = run(device, num=args.num, steps=args.steps, ago_steps=args.ago_steps,
                     batch_size=args.batch_size, work=Path(tmp))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["identical_images"] else 1


if __name__ == "__main__":
    sys.exit(main())
