"""Anatomy and MR physics of the demo dataset: the shipped template, tissue relaxation times and the
signal equations that turn tissue fractions into any sequence.

Why physics rather than image filters: the sequences then differ the way real ones do (CSF dark on T1
and FLAIR, bright on T2; oedema bright on T2/FLAIR; enhancement only after contrast), so a synthesis
model has real, sequence-specific information to learn and to miss.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnsynth.exceptions import NnsynthError

ASSETS_FOLDER = Path(__file__).resolve().parent / "assets"
TEMPLATE_FILE = "mni152_2mm.npz"

# Tissue classes, in the order used for fraction stacks.
TISSUES: Tuple[str, ...] = ("CSF", "GM", "WM", "ED", "NCR", "ET")


@dataclasses.dataclass(frozen=True)
class Tissue:
    """Relaxation times (ms) and proton density (relative to water) of one tissue."""

    t1: float
    t2: float
    pd: float


# Literature values around 1.5-3 T, rounded. Healthy tissue: Wansapura et al., JMRI 1999 (3 T: WM T1 832 /
# T2 80 ms, GM T1 1331 / T2 110 ms); CSF T1 ~4 s, T2 ~2 s; PD: Whittall et al. 1997 (WM ~0.70, GM ~0.80).
# Lesions (ranges reported for glioblastoma at 1.5-3 T, e.g. Hattingen et al. 2013, Blystad et al. 2017):
# vasogenic oedema has long T1/T2 (extra water), necrosis is fluid-like, enhancing tumour is cellular
# tissue with moderately long T1/T2 that enhances after gadolinium.
TISSUE_TABLE: Dict[str, Tissue] = {
    "CSF": Tissue(t1=4000.0, t2=2000.0, pd=1.00),
    "GM": Tissue(t1=1330.0, t2=110.0, pd=0.80),
    "WM": Tissue(t1=830.0, t2=80.0, pd=0.70),
    "ED": Tissue(t1=1500.0, t2=250.0, pd=0.86),    # peritumoural oedema (label 2)
    "NCR": Tissue(t1=2500.0, t2=400.0, pd=0.90),   # necrotic core (label 1)
    "ET": Tissue(t1=1500.0, t2=130.0, pd=0.87),    # enhancing tumour, before contrast (label 3)
}

# Gadolinium relaxivity r1 (per mM per ms; ~4 /mM/s at 1.5-3 T) and the concentration range in
# enhancing tumour (mM) that the generator draws from.
GD_RELAXIVITY_PER_MM_MS = 4.0e-3
GD_CONCENTRATION_MM = (0.3, 0.8)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """Acquisition parameters of one sequence (ms). ``ti`` set means inversion recovery."""

    name: str
    tr: float
    te: float
    ti: Optional[float] = None
    contrast_agent: bool = False


def flair_null_ti(t1_csf: float, tr: float) -> float:
    """Inversion time that nulls a tissue with longitudinal relaxation ``t1_csf`` at repetition ``tr``.

    Solves 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0.
    """
    return float(-t1_csf * np.log((1.0 + np.exp(-tr / t1_csf)) / 2.0))


_FLAIR_TR = 9000.0
# Canonical spelling and parameters; names are matched case-insensitively.
SEQUENCE_TABLE: Dict[str, SequenceSpec] = {
    "T1": SequenceSpec("T1", tr=500.0, te=12.0),
    "T1Gd": SequenceSpec("T1Gd", tr=500.0, te=12.0, contrast_agent=True),
    "T2": SequenceSpec("T2", tr=5000.0, te=100.0),
    "Flair": SequenceSpec("Flair", tr=_FLAIR_TR, te=120.0, ti=flair_null_ti(TISSUE_TABLE["CSF"].t1, _FLAIR_TR)),
    "PD": SequenceSpec("PD", tr=5000.0, te=15.0),
}
# Stable small integer per sequence so that a sequence's random stream does not depend on --sequences order.
SEQUENCE_CODES: Dict[str, int] = {name: i for i, name in enumerate(SEQUENCE_TABLE)}


def canonical_sequences(names: Sequence[str]) -> Tuple[str, ...]:
    """Map user-given sequence names to their canonical spelling; raise listing the valid ones."""
    lookup = {k.lower(): k for k in SEQUENCE_TABLE}
    valid = ", ".join(SEQUENCE_TABLE)
    out, unknown = [], []
    for n in names:
        key = n.strip().lower()
        if key in lookup:
            out.append(lookup[key])
        else:
            unknown.append(n)
    if unknown:
        raise NnsynthError(f"Unknown sequence(s) {', '.join(repr(u) for u in unknown)}; the demo generator "
                           f"simulates {valid} (any subset, any order, case-insensitive)")
    dupes = sorted({s for s in out if out.count(s) > 1})
    if dupes:
        raise NnsynthError(f"Sequence(s) listed more than once: {', '.join(dupes)}")
    if len(out) < 2:
        raise NnsynthError(f"Synthesis needs at least 2 sequences, got {len(out)} ({', '.join(out) or 'none'}); "
                           f"choose from {valid}")
    return tuple(out)


def signal(seq: SequenceSpec, t1: np.ndarray, t2: np.ndarray, pd: np.ndarray) -> np.ndarray:
    """Magnitude signal of one sequence for given relaxation times (broadcasting numpy arrays).

    Spin echo: PD (1 - e^{-TR/T1}) e^{-TE/T2}; inversion recovery: PD |1 - 2e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2}.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    t2 = np.asarray(t2, dtype=np.float64)
    decay = np.exp(-seq.te / t2)
    if seq.ti is None:
        return pd * (1.0 - np.exp(-seq.tr / t1)) * decay
    return pd * np.abs(1.0 - 2.0 * np.exp(-seq.ti / t1) + np.exp(-seq.tr / t1)) * decay


def with_contrast(t1: float, concentration_mm: float) -> float:
    """T1 shortened by gadolinium: 1/T1' = 1/T1 + r1 C."""
    return 1.0 / (1.0 / t1 + GD_RELAXIVITY_PER_MM_MS * concentration_mm)


@dataclasses.dataclass(frozen=True)
class Template:
    """The shipped 2 mm template: float32 maps in [0, 1] in SimpleITK array order (z, y, x), LPS, identity
    direction. ``origin`` is LPS mm of voxel [0, 0, 0] in physical order (x, y, z)."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    spacing: float
    origin: Tuple[float, float, float]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the packaged template once per process (no nilearn, no network)."""
    path = ASSETS_FOLDER / TEMPLATE_FILE
    if not path.is_file():
        raise NnsynthError(f"The demo anatomy asset {path} is missing from this installation; reinstall "
                           f"nnsynth or rebuild it with benchmarks/make_demo_assets.py (needs nilearn)")
    with np.load(path) as d:
        mask = d["mask"].astype(np.float32)
        t1 = d["t1"].astype(np.float32) / 255.0
        gm = d["gm"].astype(np.float32) / 255.0
        wm = d["wm"].astype(np.float32) / 255.0
        spacing = float(np.asarray(d["spacing"]).ravel()[0])
        origin = tuple(float(v) for v in d["origin"])
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    for a in (t1, gm, wm, csf, mask):
        a.setflags(write=False)
    return Template(t1=t1, gm=gm, wm=wm, csf=csf, mask=mask, spacing=spacing, origin=origin)  # type: ignore[arg-type]


def mix_signal(seq: SequenceSpec, fractions: Mapping[str, np.ndarray], tissues: Mapping[str, Tissue],
               gd_concentration: float = 0.0, pd_modulation: Optional[np.ndarray] = None) -> np.ndarray:
    """Partial-volume signal: sum over tissues of fraction x signal of that tissue.

    Gadolinium (``gd_concentration`` mM) shortens T1 of the enhancing tumour only, and only for sequences
    acquired after contrast.
    """
    out: Optional[np.ndarray] = None
    for name, frac in fractions.items():
        tissue = tissues[name]
        t1 = tissue.t1
        if seq.contrast_agent and name == "ET" and gd_concentration > 0:
            t1 = with_contrast(t1, gd_concentration)
        s = float(signal(seq, t1, tissue.t2, tissue.pd))
        out = frac * np.float32(s) if out is None else out + frac * np.float32(s)
    if out is None:
        raise ValueError("no tissue fractions given: cannot synthesise a signal")
    if pd_modulation is not None:
        out = out * pd_modulation
    return out
