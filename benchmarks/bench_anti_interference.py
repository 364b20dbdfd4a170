"""Anti-interference (VQ-Seq2Seq paper, Table 2): reconstruct an input from a corrupted copy of itself.

A demo dataset with every sequence present trains seq2seq and vq_seq2seq on the same data for the same
wall-clock budget (``--minutes`` each, fold 0). For every held-out test case and sequence X_i, the
preprocessed input is corrupted with a FIXED interference and the model reconstructs X_i from it (source =
target = i); the clean X_i is the reference, scored per CONTRACT.md section 5 inside the brain mask
(preprocessed space):

- noise: additive Gaussian noise, sigma = ``--noise-sigma`` (default 0.1 of the [0, 1] range), fixed seed;
- bias field: ``exp(alpha * scale * q)`` with a fixed random order-3 polynomial q (max |q| = 1),
  alpha = ``--bias-alpha`` (default 2), scale 0.2 (the strongest field of the training augmentation);
- clean: no corruption (the plain reconstruction quality, for reference).

    python benchmarks/bench_anti_interference.py --minutes 2           # a short smoke run (CPU)
    python benchmarks/bench_anti_interference.py --minutes 60 --device cuda --cases 60 --spacing 2
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unpaired_chain import (common_parser, load_predictor, prepare_and_train, summarise,  # noqa: E402
                                  test_cases)

logger = logging.getLogger("bench")

DATASET_ID = 598
DATASET_NAME = "InterferenceDemo"
CORRUPTION_SEED = 2024


def corrupt(volume: np.ndarray, kind: str, noise_sigma: float, bias_alpha: float, seed: int) -> np.ndarray:
    """The fixed interference of ``kind`` ('clean', 'noise', 'bias_field') on a (Z, Y, X) volume in [0, 1]."""
    from nnsynth.training.augmentation_domain import bias_field
    if kind == "clean":
        return volume.copy()
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return volume + noise_sigma * torch.randn(volume.shape, generator=g).numpy().astype(np.float32)
    if kind == "bias_field":
        field = bias_field(volume.shape, bias_alpha, 0.2, 3, g).numpy().astype(np.float32)
        return volume * field
    raise ValueError(kind)


def evaluate(dataset_id: int, raw: Path, trainers: Sequence[str], device: str, noise_sigma: float,
             bias_alpha: float) -> Dict[str, Any]:
    from nnsynth.dataset.io import read_image
    from nnsynth.evaluation.metrics import compute_metrics
    cases = test_cases(raw)
    results: Dict[str, Any] = {}
    for trainer in trainers:
        pred = load_predictor(dataset_id, trainer, device)
        rows: Dict[str, List[Dict[str, float]]] = {"clean": [], "noise": [], "bias_field": []}
        for ci, (case, files) in enumerate(cases.items()):
            images, geom = [None] * len(pred.sequences), None
            for name, f in files.items():
                arr, geom = read_image(f)
                images[pred.sequence_index(name)] = arr
            data, seg, _ = pred.preprocess(images, geom, case)
            mask = np.asarray(seg[0]) >= 0
            for i, name in enumerate(pred.sequences):
                for kind in ("clean", "noise", "bias_field"):
                    bad = data.copy()
                    bad[i] = corrupt(data[i], kind, noise_sigma, bias_alpha, CORRUPTION_SEED + 31 * ci + i)
                    out = pred.predict_preprocessed(bad, seg, [i], i)["prediction"]
                    m = compute_metrics(data[i], out, mask, compute_lpips=True)
                    rows[kind].append({"case": case, "sequence": name,
                                       **{k: float(v) for k, v in m.items() if v is not None}})
                    if kind != "clean":   # how bad the corrupted input itself is, against the clean one
                        mi = compute_metrics(data[i], np.clip(bad[i], 0, 1), mask, compute_lpips=False)
                        rows.setdefault(f"{kind}_input", []).append({"case": case, "sequence": name,
                                                                     "psnr": float(mi["psnr"]),
                                                                     "ssim": float(mi["ssim"])})
        results[trainer] = {k: {"summary": summarise(v), "per_case": v} for k, v in rows.items()}
    return results


def table(results: Dict[str, Any], title: str) -> str:
    lines = [f"### {title}", "", "| trainer | clean PSNR / SSIM | noise PSNR / SSIM / LPIPS | bias field PSNR / SSIM / LPIPS |",
             "| --- | --- | --- | --- |"]
    for trainer, res in results.items():
        cells = []
        for kind in ("clean", "noise", "bias_field"):
            s = res[kind]["summary"]
            lp = f" / {s['lpips']['mean']:.2f}" if "lpips" in s and kind != "clean" else (" / n/a" if kind != "clean" else "")
            cells.append(f"{s['psnr']['mean']:.2f}±{s['psnr']['std']:.2f} / {s['ssim']['mean']:.3f}{lp}")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    inp = [f"{k}: PSNR {first[k + '_input']['summary']['psnr']['mean']:.2f}, SSIM "
           f"{first[k + '_input']['summary']['ssim']['mean']:.3f}" for k in ("noise", "bias_field")]
    lines.append("")
    lines.append("Corrupted inputs themselves vs the clean images: " + "; ".join(inp))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = common_parser(__doc__.splitlines()[0], "/tmp/nnsynth_bench_interference")
    p.add_argument("--noise-sigma", type=float, default=0.1)
    p.add_argument("--bias-alpha", type=float, default=2.0)
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    raw, times = prepare_and_train(args, DATASET_ID, DATASET_NAME, "random")
    results = evaluate(DATASET_ID, raw, args.trainers, args.device, args.noise_sigma, args.bias_alpha)
    out = {"benchmark": "anti-interference", "args": vars(args), "train_seconds": times, "results": results}
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    print(table(results, f"Anti-interference on the demo ({args.minutes} min per model, {args.cases} training "
                         f"cases, {args.test_cases} test cases x 4 sequences; noise sigma {args.noise_sigma}, "
                         f"bias alpha {args.bias_alpha})"))
    print(f"\nresults: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
