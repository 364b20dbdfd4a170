"""How good can Flair synthesis on the demo dataset get? Oracle scores of the held-out test cases.

The demo generator renders each sequence as signal x (shared coil bias x per-sequence bias) + Rician noise. No
model can predict the target's own noise, nor its per-sequence bias field (independent of the sources), so this
script scores, per CONTRACT.md section 5, the real test Flair against:

- ``noise-free``: the same Flair rendered without noise (same anatomy, bias fields and gain);
- ``no own bias``: rendered without noise and without the Flair's own bias field (shared coil bias kept), i.e. the
  best any model that reads the sources could do.

It regenerates the cases from the demo configuration (default: the built-in demo), so no dataset is needed.

    python benchmarks/demo_synthesis_ceiling.py [--target Flair]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="Flair")
    a = p.parse_args(argv)
    import nnsynth.dataset.demo.generator as gen_module
    from nnsynth.evaluation.metrics import compute_metrics

    gen = gen_module.DemoGenerator(gen_module.DemoConfig())
    c = gen.config
    noise, own_bias = gen_module.NOISE_FRACTION_RANGE, gen_module.BIAS_SD_PER_SEQUENCE
    rows = []
    try:
        for idx in range(c.num_cases, c.num_cases + c.num_test_cases):
            gen_module.NOISE_FRACTION_RANGE, gen_module.BIAS_SD_PER_SEQUENCE = noise, own_bias
            case = gen.simulate(idx, [a.target])
            gen_module.NOISE_FRACTION_RANGE = (0.0, 0.0)        # same random draws, sigma 0
            clean = gen.simulate(idx, [a.target]).images[a.target]
            gen_module.BIAS_SD_PER_SEQUENCE = 0.0
            clean_no_bias = gen.simulate(idx, [a.target]).images[a.target]
            ref = case.images[a.target]
            rows.append({"case_index": idx, "tumour": case.tumour_centre is not None,
                         "noise_free": compute_metrics(ref, clean, compute_lpips=False)["psnr"],
                         "no_own_bias": compute_metrics(ref, clean_no_bias, compute_lpips=False)["psnr"]})
    finally:
        gen_module.NOISE_FRACTION_RANGE, gen_module.BIAS_SD_PER_SEQUENCE = noise, own_bias
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("noise_free", "no_own_bias")}
    sys.stdout.write(json.dumps({"target": a.target, "mean_psnr": mean, "per_case": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
