"""Would averaging predictions made from different source subsets beat the one prediction from all sources?

``nnsynth_predict`` synthesises a target from every sequence a case has, encoded jointly. A model trained on
random source subsets can also predict the same target from each subset that leaves one source out, and the
sources' noise and artefacts are independent, so the members' errors may differ where geometric test-time
augmentation (``--tta``) gives the same error again. This scores, for every target and every case that has all
sequences: the prediction from all other sequences, the one from each leave-one-out subset, and the voxelwise
mean of every combination of two or more of them (CONTRACT.md section 5 metrics; each member calibrated as
``nnsynth_predict`` calibrates it).

A combination can only become a default if it can be chosen without the test cases: ``--cases train`` scores the
training cases (the validation set of a fold ``all`` model) to show whether the choice made there agrees with
the held-out one.

Reads a ``bench_seq2seq_quality.py`` work folder (its dataset and model):

    python benchmarks/source_subset_ensemble.py --work /tmp/s23/b095 [--cases test|train] [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnsynth.dataset.io import Geometry, read_image
from nnsynth.evaluation.metrics import compute_metrics
from nnsynth.inference.predictor import Predictor, find_model_folder
from nnsynth.paths import use_data_root
from nnsynth.utils.files import save_json
from nnsynth.utils.log import setup_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intensity_lookup_baseline import _channel_ids  # noqa: E402

logger = logging.getLogger("nnsynth.benchmarks.source_subset_ensemble")

ALL = "all"


def complete_cases(folder: Path, ids: Dict[str, str], ending: str) -> List[str]:
    """Cases of ``folder`` that have a file for every sequence."""
    cases = sorted({p.name[: -len(ending) - 5] for p in folder.glob(f"*{ending}")})
    return [c for c in cases if all((folder / f"{c}_{i}{ending}").is_file() for i in ids.values())]


def member_name(dropped: Optional[str]) -> str:
    """"all" for the prediction from every other sequence, "without X" for the one that leaves X out."""
    return ALL if dropped is None else f"without {dropped}"


def predict_members(predictor: Predictor, images: Dict[str, np.ndarray], geometry: Geometry, target: str,
                    case: str) -> Dict[str, np.ndarray]:
    """{member: prediction of ``target``} from all other sequences and from each leave-one-out subset."""
    sources = [s for s in images if s != target]
    out = {}
    for dropped in [None] + (sources if len(sources) > 1 else []):
        subset = {s: images[s] for s in sources if s != dropped}
        res = predictor.predict_case(subset, geometry, [target], case=case)
        out[member_name(dropped)] = res.predictions[target]
    return out


def score_combinations(truth: List[np.ndarray], members: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Mean PSNR over the cases of every member alone and of the mean of every combination of members."""
    names = list(members[0])
    scores: Dict[str, float] = {}
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            values = [compute_metrics(ref, np.mean([m[n] for n in combo], axis=0), None,
                                      compute_lpips=False)["psnr"] for ref, m in zip(truth, members)]
            scores[" + ".join(combo)] = float(np.mean(values))
    return scores


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a bench_seq2seq_quality.py --work folder")
    p.add_argument("--fold", default="all")
    p.add_argument("--configuration", "-c", default="2d", help="the work folder's configuration (its -c)")
    p.add_argument("--cases", choices=("test", "train"), default="test",
                   help="test: the held-out cases (imagesTs_truth); train: the training cases with every sequence")
    p.add_argument("--max-cases", type=int, default=8)
    p.add_argument("--targets", nargs="*", default=None, help="default: every sequence")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    setup_logging()
    use_data_root(a.work)
    raw = next((a.work / "raw").glob("Dataset*"))
    ids, ending = _channel_ids(raw)
    folder = raw / ("imagesTs_truth" if a.cases == "test" else "imagesTr")
    cases = complete_cases(folder, ids, ending)[: a.max_cases]
    if not cases:
        raise SystemExit(f"{folder} has no case with every sequence ({', '.join(ids)})")
    predictor = Predictor(find_model_folder(raw.name, "seq2seq", a.configuration).path, [a.fold], progress=False)
    targets = a.targets or list(ids)
    loaded = {case: {s: read_image(folder / f"{case}_{i}{ending}") for s, i in ids.items()} for case in cases}
    result: Dict[str, Dict[str, float]] = {}
    for target in targets:
        truth, members = [], []
        for case, read in loaded.items():
            images = {s: array for s, (array, _) in read.items()}
            truth.append(images[target])
            members.append(predict_members(predictor, images, read[target][1], target, case))
        result[target] = score_combinations(truth, members)
        best = max(result[target], key=result[target].get)
        logger.info("%s (%d %s cases): from all %.2f dB; best %s %.2f dB", target, len(cases), a.cases,
                    result[target][ALL], best, result[target][best])
        for name, value in sorted(result[target].items(), key=lambda kv: -kv[1]):
            logger.info("  %-60s %.2f", name, value)
    if a.json:
        save_json({"work": str(a.work), "cases": a.cases, "case_ids": cases, "psnr": result}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
