"""Time forward + backward of each synthesis loss term at a training batch's size, on the current machine's threads.

    python benchmarks/bench_loss_terms.py [--threads 2] [--batch 7] [--shape 3 96 80] [--repeats 20]

The default shape is the demo's default 2.5D CPU batch (7 samples x 3 slices of 96 x 80). Besides nnsynth's own
terms it times a reference SSIM whose Gaussian filtering uses one-channel convolutions (how nnsynth filtered before
the shifted-sum version), so the two can be compared on any machine. Prints one JSON object (milliseconds).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from nnsynth.losses.reconstruction import intensity_balance_weights, masked_l1
from nnsynth.losses.ssim import SSIM_K1, SSIM_K2, gaussian_kernel_1d, ssim


def ssim_with_convolutions(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: the same SSIM, filtered with conv2d/conv3d and a 1-D kernel per axis."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    x, y = x.reshape(b * c, 1, *spatial), y.reshape(b * c, 1, *spatial)
    kernel = gaussian_kernel_1d(11, 1.5, x.dtype, x.device)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = kernel.numel()
        stacked = conv(stacked, kernel.reshape(shape))
    mu_x, mu_y, xx, yy, xy = stacked.split(b * c)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * (xy - mu_x * mu_y) + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (xx - mu_x ** 2 + yy - mu_y ** 2 + c2))
    return s.mean()


def time_term(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pred: torch.Tensor, target: torch.Tensor,
              repeats: int) -> float:
    times: List[float] = []
    for i in range(repeats + 3):
        p = pred.detach().clone().requires_grad_(True)
        t = time.perf_counter()
        fn(p, target).backward()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times[3:]))   # the first calls warm up allocators


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=7)
    ap.add_argument("--shape", type=int, nargs="+", default=[3, 96, 80], help="channels and 2 or 3 spatial sizes")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target = torch.rand(args.batch, *args.shape)
    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    terms: Dict[str, Callable] = {
        "l1": lambda p, t: masked_l1(p, t),
        "intensity_balanced_l1": lambda p, t: masked_l1(p, t, intensity_balance_weights(t, 0.5)),
        "ssim": lambda p, t: 1 - ssim(p, t),
        "ssim_reference_convolutions": lambda p, t: 1 - ssim_with_convolutions(p, t),
    }
    gap = abs(float(ssim(pred, target)) - float(ssim_with_convolutions(pred, target)))
    result = {"threads": args.threads, "batch": [args.batch, *args.shape], "repeats": args.repeats,
              "forward_backward_ms": {k: round(time_term(f, pred, target, args.repeats), 2) for k, f in terms.items()},
              "ssim_difference_to_reference": gap}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
