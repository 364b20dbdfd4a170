"""How much better could the quantile calibration be? Score a model's uncalibrated test predictions with its own
learned map and with maps fitted on the test cases themselves.

nnsynth learns one monotone intensity map per target from the model's full-volume validation predictions
(``calibration.json``; for fold ``all`` those are the training cases). This asks whether that map is the
limit of the method: the same least-squares fit on the test cases' own truth (the "oracle", which no user can
have) bounds what any map of this family can add, and the leave-one-out fit (each test case mapped by the fit on
the other test cases) is what a map learned on unseen subjects would give. If the learned map scores like the
oracle, a better calibration cannot close a gap; only a better model can.

Reads a ``bench_seq2seq_quality.py`` work folder (it keeps ``predict_out_uncalibrated`` and the model):

    python benchmarks/calibration_headroom.py --work /tmp/s20/base [--fold all] [--target Flair] [--json out.json]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnsynth.dataset.io import read_image
from nnsynth.evaluation.metrics import compute_metrics
from nnsynth.inference.calibration import CalibrationCollector, apply_calibration, load_offsets
from nnsynth.utils.files import save_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intensity_lookup_baseline import _channel_ids  # noqa: E402

logger = logging.getLogger("nnsynth.benchmarks.calibration_headroom")


def _psnr(ref: np.ndarray, pred: np.ndarray, offsets: Optional[np.ndarray]) -> float:
    """CONTRACT.md section 5 PSNR, after the map when ``offsets`` is given (mask: the truth's nonzero voxels)."""
    if offsets is not None:
        pred = apply_calibration(pred, ref != 0, offsets)
    return float(compute_metrics(ref, pred, None, compute_lpips=False)["psnr"])


def _fit(pairs: Dict[str, tuple], target: str, skip: Optional[str] = None) -> np.ndarray:
    collector = CalibrationCollector()
    for case, (ref, pred) in pairs.items():
        if case != skip:
            collector.add(target, pred, ref, ref != 0)
    offsets = collector.offsets(target)
    if offsets is None:
        raise SystemExit("no test image could be used for a fit")
    return offsets


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a bench_seq2seq_quality.py --work folder")
    p.add_argument("--target", default="Flair")
    p.add_argument("--fold", default="all", help="the fold the work folder's predictions came from (its --fold)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    raws = sorted((a.work / "raw").glob("Dataset*"))
    # only the model bench_seq2seq_quality.py predicted with: a reused work folder may hold other folds
    folds = sorted((a.work / "results").glob(f"Dataset*/seq2seq__*/fold_{a.fold}"))
    predictions = a.work / "predict_out_uncalibrated"
    if not raws or not folds or not predictions.is_dir():
        raise SystemExit(f"{a.work} is not a finished bench_seq2seq_quality.py work folder")
    ids, ending = _channel_ids(raws[0])
    suffix = f"_{ids[a.target]}{ending}"
    truth = raws[0] / "imagesTs_truth"
    pairs = {f.name[: -len(suffix)]: (read_image(truth / f.name)[0], read_image(f)[0])
             for f in sorted(predictions.glob(f"*{suffix}")) if (truth / f.name).is_file()}
    if len(pairs) < 2:
        raise SystemExit(f"need at least 2 scored test cases in {predictions}, found {len(pairs)}")
    learned = load_offsets(folds).get(a.target)
    if learned is None:
        raise SystemExit(f"the model in {folds} has no calibration for {a.target}")
    oracle = _fit(pairs, a.target)
    rows = []
    for case, (ref, pred) in pairs.items():
        rows.append({"case": case, "uncalibrated": _psnr(ref, pred, None), "learned": _psnr(ref, pred, learned),
                     "oracle": _psnr(ref, pred, oracle),
                     "leave_one_out": _psnr(ref, pred, _fit(pairs, a.target, skip=case))})
    result = {"cases": len(rows), "folds": [str(f) for f in folds],
              "mean_psnr": {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"},
              "offsets": {"learned": learned.tolist(), "oracle": oracle.tolist()}, "per_case": rows}
    for key, value in result["mean_psnr"].items():
        logger.info("%s: %.2f dB", key, value)
    if a.json:
        save_json(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
