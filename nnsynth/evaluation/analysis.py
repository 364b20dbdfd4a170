"""Explainability of a trained model (Seq2Seq paper sec. 3.5): which sequence carries unique information?

- Synthesis matrix ``A_ij = nPSNR_ij + nSSIM_ij - nLPIPS_ij`` for source i -> target j, each metric averaged over
  the cases and z-normalised over the off-diagonal entries of the matrix (i = j is reconstruction, not
  synthesis, and is left out). Without local LPIPS weights the LPIPS term is dropped, and the outputs say so.
- Totipotency ``C_t(i) = mean_j A_ij`` (how well i synthesises the others) and imaging differentiation
  ``C_d(i) = -mean_j A_ji`` (how hard i is to synthesise from the others), means over j != i; rankings.
- Imaging-differentiation map ``M_d(X_i) = mean over the other available sources j != i of |X'_{j->i} - X_i|``
  (eq. 5; the paper's code also averaged j = i, which is excluded here), per case, in the case's geometry.
- For trainers with source weights (TSF), the contribution table: omega of every source subset x target.

Everything is computed in the preprocessed, normalised space of the plans (metrics with CONTRACT.md section 5).
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import atomic_path, save_json

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ------------------------------------------------------------------------------
MATRIX_METRICS = ("psnr", "ssim", "lpips")
#: sign of each metric in A_ij (higher A = better synthesis)
METRIC_SIGNS = {"psnr": 1.0, "ssim": 1.0, "lpips": -1.0}


# ============================================================================================================
# the numbers (pure functions, tested by hand)
# ============================================================================================================
def off_diagonal(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def z_normalise(matrix: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the finite off-diagonal entries (population std); the diagonal stays NaN.

    A constant matrix (std 0) normalises to 0."""
    m = np.asarray(matrix, dtype=np.float64)
    out = np.full(m.shape, np.nan)
    sel = off_diagonal(m.shape[0]) & np.isfinite(m)
    if not sel.any():
        return out
    mu, sd = m[sel].mean(), m[sel].std()
    constant = sd <= 1e-12 * max(1.0, abs(mu))          # rounding makes the std of equal values ~1e-17
    out[sel] = 0.0 if constant else (m[sel] - mu) / sd
    return out


def synthesis_matrix(metrics: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, List[str]]:
    """A = sum over the available metrics of sign x z-normalised matrix; returns (A, metrics used).

    ``metrics`` maps 'psnr', 'ssim' and optionally 'lpips' to (N, N) matrices [source, target]; a missing or
    all-NaN LPIPS matrix is left out."""
    used = [k for k in MATRIX_METRICS if k in metrics and metrics[k] is not None
            and np.isfinite(np.asarray(metrics[k], dtype=np.float64)[off_diagonal(len(metrics[k]))]).any()]
    if "psnr" not in used or "ssim" not in used:
        raise NnsynthError("The synthesis matrix needs PSNR and SSIM for at least one source -> target pair")
    n = np.asarray(metrics["psnr"]).shape[0]
    a = np.zeros((n, n))
    for k in used:
        a = a + METRIC_SIGNS[k] * z_normalise(metrics[k])
    a[np.eye(n, dtype=bool)] = np.nan
    return a, used


def totipotency(a: np.ndarray) -> np.ndarray:
    """C_t(i) = mean over j != i of A_ij (NaN entries, i.e. pairs never seen, are skipped)."""
    a = np.asarray(a, dtype=np.float64).copy()
    a[np.eye(a.shape[0], dtype=bool)] = np.nan
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in a])


def differentiation(a: np.ndarray) -> np.ndarray:
    """C_d(i) = -mean over j != i of A_ji."""
    return -totipotency(np.asarray(a).T)


def differentiation_map(target: np.ndarray, predictions: Mapping[int, np.ndarray], index: int) -> np.ndarray:
    """M_d(X_i) = mean over j != i of |X'_{j->i} - X_i|; ``predictions`` maps source j to X'_{j->i}."""
    others = [j for j in predictions if j != index]
    if not others:
        raise NnsynthError("M_d needs at least one prediction from another source")
    acc = np.zeros(np.shape(target), np.float32)
    for j in others:
        acc += np.abs(np.asarray(predictions[j], np.float32) - np.asarray(target, np.float32))
    return acc / len(others)


def ranking_table(sequences: Sequence[str], c_t: np.ndarray, c_d: np.ndarray,
                  mean_map: Optional[Mapping[str, float]] = None) -> pd.DataFrame:
    """One row per sequence: C_t, C_d and their ranks (1 = highest)."""
    df = pd.DataFrame({"sequence": list(sequences), "totipotency": c_t, "differentiation": c_d})
    df["rank_totipotency"] = df["totipotency"].rank(ascending=False, method="min")
    df["rank_differentiation"] = df["differentiation"].rank(ascending=False, method="min")
    if mean_map is not None:
        df["mean_differentiation_map"] = [mean_map.get(s, np.nan) for s in sequences]
    return df


# ============================================================================================================
# plots and files
# ============================================================================================================
def _write_csv(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=index)


def plot_heatmap(matrix: np.ndarray, sequences: Sequence[str], path: PathLike, title: str) -> None:
    """Annotated heat map, rows = source, columns = target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(sequences)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis")
    ax.set_xticks(range(n), sequences)
    ax.set_yticks(range(n), sequences)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_bars(panels: Mapping[str, Mapping[str, float]], path: PathLike, title: str = "") -> None:
    """One bar chart per panel ({panel title: {label: value}}), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        labels = list(values)
        ax.bar(range(len(labels)), [values[k] for k in labels], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# ============================================================================================================
# running it on a model
# ============================================================================================================
CaseData = Tuple[str, np.ndarray, np.ndarray, Dict[str, Any], str]   # name, data, seg, properties, file ending


def preprocessed_validation_cases(predictor: Any, fold: str, max_cases: Optional[int] = None) -> Iterator[CaseData]:
    """The validation cases of ``fold`` from ``nnSynth_preprocessed`` (fold 'all': every case, with a warning)."""
    from nnsynth import paths
    from nnsynth.preprocessing import storage
    from nnsynth.training.splits import fold_cases
    pre = paths.preprocessed_folder() / predictor.model.dataset
    folder = pre / predictor.config["data_identifier"]
    cases = storage.list_cases(folder)
    if not cases:
        raise NnsynthError(f"No preprocessed cases in {folder}; run nnsynth_plan_and_preprocess for "
                           f"{predictor.model.dataset} or give cases with -i")
    if str(fold) == "all":
        logger.warning("Fold 'all' trained on every case: the analysis runs on training cases")
    _, val = fold_cases(pre, cases, fold)
    for name in val[:max_cases] if max_cases else val:
        data, seg, props = storage.load_case(folder, name)
        yield name, data, seg, props, predictor.spec.file_ending


def folder_cases(predictor: Any, folder: PathLike, max_cases: Optional[int] = None) -> Iterator[CaseData]:
    """Raw cases of a folder ({case}_{XXXX}{ending}), preprocessed like training; bad cases are skipped."""
    from nnsynth.inference.predictor import discover_input_cases, read_input_case
    cases, _ = discover_input_cases(folder, predictor.spec)
    names = list(cases)[:max_cases] if max_cases else list(cases)
    for name in names:
        try:
            images, geometry = read_input_case(cases[name], predictor.spec)
        except NnsynthError as e:
            logger.error("%s: skipped: %s", name, e)
            continue
        by_index: List[Optional[np.ndarray]] = [None] * len(predictor.sequences)
        for s, a in images.items():
            by_index[predictor.sequence_index(s)] = a
        data, seg, props = predictor.preprocess(by_index, geometry, name)
        yield name, data, seg, props, cases[name].ending


def analyze_cases(cases: Iterable[Tuple[Any, CaseData]], output_folder: PathLike, save_maps: bool = True,
                  lpips: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Every ordered pair i -> j (i != j) of each case's available sequences: metrics rows; writes M_d maps.

    ``cases`` yields (predictor, case data): each case is synthesised by its own predictor (e.g. the fold whose
    validation set holds it). Returns the per-pair rows (case, source, target, psnr, ssim, mae[, lpips]) and one
    row per (case, target) with the mean of M_d inside the brain."""
    from nnsynth.dataset.io import Geometry, write_image
    from nnsynth.evaluation.evaluate import lpips_available
    from nnsynth.evaluation.metrics import compute_metrics
    from nnsynth.inference.sliding_window import PREDICTION_KEY
    if lpips is None:
        lpips = lpips_available()[0]
    out = Path(output_folder)
    rows: List[Dict[str, Any]] = []
    for predictor, (name, data, seg, props, ending) in cases:
        cid = dict(zip(predictor.sequences, predictor.channel_ids))
        avail = [i for i, a in enumerate(props["available"]) if a]
        if len(avail) < 2:
            logger.info("%s: fewer than 2 sequences, nothing to analyse", name)
            continue
        brain = seg[0] >= 0
        for j in avail:
            ref_mask = brain & (data[j] != 0)   # j: target, i: source
            preds: Dict[int, np.ndarray] = {}
            for i in avail:
                if i == j:
                    continue
                pred = predictor.predict_preprocessed(data, seg, [i], j)[PREDICTION_KEY]
                m = compute_metrics(data[j], pred, ref_mask if ref_mask.any() else None, compute_lpips=lpips)
                rows.append({"case": name, "source": predictor.sequences[i], "target": predictor.sequences[j],
                             "psnr": m["psnr"], "ssim": m["ssim"], "mae": m["mae"],
                             **({"lpips": m["lpips"]} if lpips else {})})
                preds[i] = pred
            if save_maps and preds:
                md = differentiation_map(data[j], preds, j)
                md[~brain] = 0
                rows.append({"case": name, "source": None, "target": predictor.sequences[j],
                             "mean_differentiation_map": float(md[brain].mean()) if brain.any() else np.nan})
                img = predictor.export(md, props, clip01=False)
                write_image(img, Geometry.from_dict(props["original_geometry"]),
                            out / "maps" / f"{name}_{cid[predictor.sequences[j]]:04d}_differentiation{ending}")
        logger.info("%s: %d sequence(s) analysed", name, len(avail))
    return rows


def contribution_table(predictor: Any) -> Optional[pd.DataFrame]:
    """omega for every non-empty source subset x target, for trainers that expose ``contribution_weights``."""
    if not any(callable(getattr(a, "contribution_weights", None)) for a in predictor.adapters):
        return None
    n = len(predictor.sequences)
    rows = []
    for t in range(n):
        others = [s for s in range(n) if s != t]
        for r in range(1, len(others) + 1):
            for subset in itertools.combinations(others, r):
                w = predictor.contribution_weights(list(subset), t) or {}
                rows.append({"target": predictor.sequences[t], "sources": "+".join(predictor.sequences[s]
                                                                                   for s in subset),
                             **{predictor.sequences[s]: w.get(predictor.sequences[s], np.nan) for s in others}})
    return pd.DataFrame(rows)


def summarize_analysis(rows: Sequence[Mapping[str, Any]], sequences: Sequence[str], output_folder: PathLike,
                       lpips_note: str = "") -> Dict[str, Any]:
    """Matrices, A, C_t/C_d rankings, CSVs and PNGs from the per-pair rows of :func:`analyze_cases`."""
    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(list(rows))
    if df.empty or "psnr" not in df or df["psnr"].notna().sum() == 0:
        raise NnsynthError("No source -> target pair could be analysed: cases need at least two sequences")
    pairs = df[df["source"].notna()].copy()
    _write_csv(pairs, out / "pair_metrics.csv")
    n = len(sequences)
    idx = {s: k for k, s in enumerate(sequences)}
    matrices: Dict[str, np.ndarray] = {}
    for metric in [c for c in ("psnr", "ssim", "mae", "lpips") if c in pairs]:
        mat = np.full((n, n), np.nan)
        vals = pairs.copy()
        vals[metric] = pd.to_numeric(vals[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
        for (s, t), v in vals.groupby(["source", "target"])[metric].mean().items():
            mat[idx[s], idx[t]] = v
        matrices[metric] = mat
        _write_csv(pd.DataFrame(mat, index=pd.Index(sequences, name="source"), columns=sequences),
                   out / f"matrix_{metric}.csv", index=True)
    a, used = synthesis_matrix(matrices)
    _write_csv(pd.DataFrame(a, index=pd.Index(sequences, name="source"), columns=sequences),
               out / "synthesis_matrix.csv", index=True)
    c_t, c_d = totipotency(a), differentiation(a)
    mean_map = None
    if "mean_differentiation_map" in df:
        mm = df[df["source"].isna()].groupby("target")["mean_differentiation_map"].mean()
        mean_map = {str(k): float(v) for k, v in mm.items()}
    ranking = ranking_table(sequences, c_t, c_d, mean_map)
    _write_csv(ranking, out / "ranking.csv")
    formula = " + ".join(("-" if METRIC_SIGNS[k] < 0 else "") + f"n{k.upper()}" for k in used).replace("+ -", "- ")
    plot_heatmap(a, sequences, out / "synthesis_matrix.png", f"A_ij = {formula} (row: source, column: target)")
    plot_bars({"totipotency C_t": dict(zip(sequences, np.nan_to_num(c_t))),
               "imaging differentiation C_d": dict(zip(sequences, np.nan_to_num(c_d)))}, out / "ranking.png")
    summary = {"formula": f"A_ij = {formula}", "metrics_used": used,
               "lpips": "used" if "lpips" in used else (lpips_note or "LPIPS unavailable: left out of A_ij"),
               "diagonal": "i = j (reconstruction) excluded from A, C_t, C_d and z-normalisation",
               "num_cases": int(df["case"].nunique()), "sequences": list(sequences),
               "synthesis_matrix": [[None if not np.isfinite(v) else float(v) for v in r] for r in a],
               "totipotency": {s: None if not np.isfinite(v) else float(v) for s, v in zip(sequences, c_t)},
               "differentiation": {s: None if not np.isfinite(v) else float(v) for s, v in zip(sequences, c_d)},
               "ranking_totipotency": ranking.sort_values("rank_totipotency")["sequence"].tolist(),
               "ranking_differentiation": ranking.sort_values("rank_differentiation")["sequence"].tolist(),
               "mean_differentiation_map": mean_map}
    save_json(summary, out / "analysis.json")
    return summary


def run_analysis(predictor: Any, cases: Iterable[Tuple[Any, CaseData]], output_folder: PathLike,
                 save_maps: bool = True) -> Dict[str, Any]:
    """The whole analysis on ``(predictor, case)`` pairs; ``predictor`` gives the sequences and, for TSF, the
    contribution table. Writes everything into ``output_folder``."""
    from nnsynth.evaluation.evaluate import lpips_available
    use_lpips, note = lpips_available()
    if not use_lpips:
        logger.warning("%s; A_ij = nPSNR + nSSIM (no LPIPS term)", note)
    rows = analyze_cases(cases, output_folder, save_maps, use_lpips)
    summary = summarize_analysis(rows, predictor.sequences, output_folder, "" if use_lpips else note)
    table = contribution_table(predictor)
    if table is not None:
        _write_csv(table, Path(output_folder) / "contributions.csv")
        full = table.groupby("target").tail(1)   # the subset with every other source
        panels = {f"omega -> {r['target']}": {s: float(r[s]) for s in predictor.sequences
                                               if s in r and s != r["target"] and np.isfinite(r[s])}
                  for _, r in full.iterrows()}
        plot_bars(panels, Path(output_folder) / "contributions.png", "sequence contributions (all sources)")
        summary["contributions"] = "contributions.csv"
        save_json(summary, Path(output_folder) / "analysis.json")
    return summary


__all__ = ["z_normalise", "synthesis_matrix", "totipotency", "differentiation", "differentiation_map",
           "ranking_table", "run_analysis", "analyze_cases", "summarize_analysis", "contribution_table",
           "preprocessed_validation_cases", "folder_cases", "plot_heatmap", "plot_bars"]
