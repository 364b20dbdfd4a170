"""Simulated multi-sequence brain MRI with tumours, built from the real MNI ICBM152 anatomy.

Each subject is the template, smoothly deformed (global affine + elastic B-spline field), with its own
tissue relaxation times, an optional tumour (necrotic core, enhancing rim, oedema), a bias field, Rician
noise and an arbitrary per-sequence scanner gain. Images come from MR signal equations
(``anatomy.signal``), so contrasts behave like real ones. Everything is drawn from random streams keyed
by (seed, case index[, sequence]) so a case does not depend on the other cases, the sequence order or
which sequences are missing.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from nnsynth.constants import (DATASET_JSON, DEMO_DATASET_ID, DEMO_DATASET_NAME, DEMO_LABELS,
                               DEMO_LABELS_TS_FOLDER, DEMO_MIN_SEQUENCES_PER_CASE, DEMO_MISSING_RATE,
                               DEMO_MONTAGE, DEMO_NUM_CASES, DEMO_NUM_TEST_CASES, DEMO_SEED, DEMO_SEQUENCES,
                               DEMO_SPACING, DEMO_TRUTH_FOLDER, DEMO_TUMOUR_PROBABILITY)
from nnsynth.dataset.cases import image_filename
from nnsynth.dataset.demo.anatomy import (GD_CONCENTRATION_MM, SEQUENCE_CODES, SEQUENCE_TABLE, TISSUE_TABLE,
                                          TISSUES, Tissue, canonical_sequences, load_template,
                                          mix_signal)
from nnsynth.dataset.io import Geometry, write_image
from nnsynth.exceptions import NnsynthError
from nnsynth.paths import dataset_name_from_folder, make_dataset_name, raw_folder
from nnsynth.utils.files import save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

FILE_ENDING = ".nii.gz"
PAIRINGS = ("random", "chain")

# Subject variability (documented in documentation/demo_dataset.md).
ROTATION_SD_DEG = 4.0            # per axis
GLOBAL_SCALE_RANGE = (0.93, 1.07)
ANISO_SCALE_SD = 0.03
SHIFT_SD_MM = 2.0
ELASTIC_CONTROL_MM = 24.0        # B-spline control-point spacing of the elastic field
ELASTIC_SD_MM = 2.5
T1_T2_JITTER_SD = 0.05           # log-normal, per subject (shared by all tissues)
PD_JITTER_SD = 0.03
TISSUE_JITTER_FRACTION = 0.4     # per-tissue jitter, as a fraction of the SDs above
TEXTURE_CONTROL_MM = 8.0         # fine proton-density texture
TEXTURE_SD = 0.02
BIAS_CONTROL_MM = 60.0
BIAS_SD_SHARED = 0.10            # log bias common to all sequences of a subject (same coil)
BIAS_SD_PER_SEQUENCE = 0.05
NOISE_FRACTION_RANGE = (0.015, 0.035)   # Rician sigma relative to the mean brain signal
GAIN_LOG10_RANGE = (1.5, 3.5)            # scanner gain: 30x to 3000x
ORIGIN_SD_MM = 4.0
GRID_PAD_MM = 4.0                # extra background around the template's bounding box (per side)
TUMOUR_RADIUS_MM = (7.0, 17.0)
TUMOUR_ELONGATION_SD = 0.15
TUMOUR_IRREGULARITY = 0.18
NECROSIS_MIN_RADIUS_MM = 9.0
NECROSIS_PROBABILITY = 0.85
NECROSIS_FRACTION = (0.35, 0.7)         # of the tumour radius
OEDEMA_FACTOR = (1.6, 2.8)              # oedema extent relative to the tumour radius (in white matter)

LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 3: (1.0, 0.85, 0.0)}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the generated images (same config -> same arrays)."""

    num_cases: int = DEMO_NUM_CASES
    num_test_cases: int = DEMO_NUM_TEST_CASES
    spacing: float = DEMO_SPACING
    sequences: Tuple[str, ...] = DEMO_SEQUENCES
    missing: float = DEMO_MISSING_RATE
    pairing: str = "random"
    seed: int = DEMO_SEED
    size_scale: float = 1.0

    def validated(self) -> "DemoConfig":
        """Return a copy with canonical sequence names; raise NnsynthError naming every bad value."""
        problems = []
        if int(self.num_cases) < 1:
            problems.append(f"--cases must be at least 1, got {self.num_cases}")
        if int(self.num_test_cases) < 0:
            problems.append(f"--test-cases must be 0 or more, got {self.num_test_cases}")
        if not 0.5 <= float(self.spacing) <= 8.0:
            problems.append(f"--spacing must be between 0.5 and 8 mm, got {self.spacing}")
        if not 0.0 <= float(self.missing) < 1.0:
            problems.append(f"--missing must be in [0, 1), got {self.missing}")
        if self.pairing not in PAIRINGS:
            problems.append(f"--pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if not 0.1 <= float(self.size_scale) <= 2.0:
            problems.append(f"--size-scale must be between 0.1 and 2, got {self.size_scale}")
        if not 0 <= int(self.seed) < 2 ** 63:
            problems.append(f"--seed must be a non-negative integer, got {self.seed}")
        try:
            seqs = canonical_sequences(list(self.sequences))
        except NnsynthError as e:
            problems.append(str(e))
            seqs = tuple(self.sequences)
        if problems:
            raise NnsynthError("Invalid demo dataset settings:\n" + "\n".join(f"  - {p}" for p in problems))
        return dataclasses.replace(self, num_cases=int(self.num_cases), num_test_cases=int(self.num_test_cases),
                                   spacing=float(self.spacing), missing=float(self.missing), seed=int(self.seed),
                                   size_scale=float(self.size_scale), sequences=seqs)


@dataclasses.dataclass
class SimulatedCase:
    """One simulated subject, every requested sequence present (missingness is applied when writing).

    ``images`` hold scanner intensities: signal x ``bias`` field + Rician noise, times ``gains``;
    ``fractions`` are the tissue fractions per voxel (keys of ``anatomy.TISSUES``), ``label`` the
    BraTS-style truth (0 bg, 1 NCR, 2 ED, 3 ET). Tests use them to check contrasts against known truth.
    """

    index: int
    images: Dict[str, np.ndarray]
    label: np.ndarray
    fractions: Dict[str, np.ndarray]
    mask: np.ndarray
    gains: Dict[str, float]
    bias: Dict[str, np.ndarray]
    geometry: Geometry
    tumour_centre: Optional[Tuple[int, int, int]]


@functools.lru_cache(maxsize=64)
def _bspline_basis(n: int, control_spacing_vox: float) -> np.ndarray:
    """(n, m) cubic B-spline weights from m control points to n samples, scaled to unit variance.

    A tensor product of these gives a smooth random field in three small matrix products, far cheaper
    than Gaussian-filtering white noise at full resolution.
    """
    h = max(float(control_spacing_vox), 1.0)
    u = np.arange(n, dtype=np.float64) / h
    j = np.arange(-1, int(np.ceil((n - 1) / h)) + 2, dtype=np.float64)
    t = np.abs(u[:, None] - j[None, :])
    w = np.where(t < 1.0, 2.0 / 3.0 - t ** 2 + 0.5 * t ** 3, np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))
    w /= np.sqrt(np.mean(np.sum(w ** 2, axis=1)))
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def smooth_field(rng: np.random.Generator, shape: Sequence[int], control_spacing_vox: float) -> np.ndarray:
    """Smooth zero-mean random field of roughly unit standard deviation (float32)."""
    wz, wy, wx = (_bspline_basis(int(n), control_spacing_vox) for n in shape)
    coef = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
    f = np.tensordot(wz, coef, axes=(1, 0))          # (nz, my, mx)
    f = np.tensordot(f, wy, axes=(1, 1))             # (nz, mx, ny)
    return np.tensordot(f, wx, axes=(1, 1))          # (nz, ny, nx), float32 throughout


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0->1 step (logistic) so lesion borders have partial volume like real images."""
    return (0.5 * (1.0 + np.tanh(x / (2.0 * width)))).astype(np.float32)


class DemoGenerator:
    """Simulates subjects for one ``DemoConfig`` on one output grid."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config.validated()
        template = load_template()
        self.template = template
        c = self.config
        tsp = template.spacing
        pad = max(1, int(np.ceil(GRID_PAD_MM * c.size_scale / c.spacing)))
        self.shape: Tuple[int, int, int] = tuple(  # type: ignore[assignment]
            max(8, int(round(n * tsp * c.size_scale / c.spacing)) + 2 * pad) for n in template.shape)
        # template voxels per output voxel; above ~1 the template is low-pass filtered first (anti-aliasing)
        step = c.spacing / (c.size_scale * tsp)
        sigma = 0.5 * np.sqrt(step ** 2 - 1.0) if step > 1.25 else 0.0
        maps = {"gm": template.gm, "wm": template.wm, "mask": template.mask}
        self._maps = {k: (ndimage.gaussian_filter(v, sigma) if sigma else v) for k, v in maps.items()}
        self._c_out = (np.array(self.shape, dtype=np.float64) - 1.0) / 2.0
        self._c_tpl = (np.array(template.shape, dtype=np.float64) - 1.0) / 2.0
        # physical centre of the template grid (x, y, z), kept as the subject's centre
        self._centre_xyz = np.array(template.origin) + self._c_tpl[::-1] * tsp

    # ------------------------------------------------------------------------------------------------
    def simulate(self, case_index: int, sequences: Optional[Sequence[str]] = None) -> SimulatedCase:
        """Simulate subject ``case_index``; render ``sequences`` (default: all of the config's)."""
        c = self.config
        lookup = {k.lower(): k for k in SEQUENCE_TABLE}
        if sequences is None:
            seqs: Tuple[str, ...] = c.sequences
        else:
            unknown = [q for q in sequences if q.lower() not in lookup]
            if unknown:
                canonical_sequences(list(unknown) + list(SEQUENCE_TABLE))  # raises with the valid names
            seqs = tuple(lookup[q.lower()] for q in sequences)
        rng = np.random.default_rng([c.seed, case_index, 0])
        mm_per_vox_tpl = self.template.spacing
        scale = c.size_scale

        # --- anatomy: affine + elastic deformation of the template --------------------------------------
        angles = rng.normal(0.0, np.deg2rad(ROTATION_SD_DEG), 3)
        s = rng.uniform(*GLOBAL_SCALE_RANGE) * np.exp(rng.normal(0.0, ANISO_SCALE_SD, 3))
        shift_mm = rng.normal(0.0, SHIFT_SD_MM, 3)
        m_inv = np.linalg.inv(_rotation(angles) @ np.diag(s))
        aff = m_inv * (c.spacing / (scale * mm_per_vox_tpl))
        offset = self._c_tpl - aff @ self._c_out - m_inv @ shift_mm / mm_per_vox_tpl
        control = ELASTIC_CONTROL_MM * scale / c.spacing
        coords = np.empty((3,) + self.shape, dtype=np.float64)
        grids = [np.arange(n, dtype=np.float64) for n in self.shape]
        for k in range(3):
            coords[k] = (aff[k, 0] * grids[0][:, None, None] + aff[k, 1] * grids[1][None, :, None]
                         + aff[k, 2] * grids[2][None, None, :] + offset[k])
            coords[k] += smooth_field(rng, self.shape, control) * (ELASTIC_SD_MM / mm_per_vox_tpl)
        warp = functools.partial(ndimage.map_coordinates, order=1, mode="constant", cval=0.0, prefilter=False,
                                 output=np.float32)
        mask = warp(self._maps["mask"], coords) >= 0.5
        # the outermost voxel layer is always background, so a deformed brain never touches the border
        for ax in range(3):
            edge_idx = [slice(None)] * 3
            for edge in (0, -1):
                edge_idx[ax] = edge
                mask[tuple(edge_idx)] = False
        # from here on, per-voxel work is done on the brain's voxels only (about a quarter of the grid)
        inside = np.flatnonzero(mask)
        pts = coords.reshape(3, -1)[:, inside]
        del coords
        g_in, w_in, m_in = (warp(self._maps[k], pts) for k in ("gm", "wm", "mask"))
        c_in = np.clip(m_in - g_in - w_in, 0.0, None)
        total = g_in + w_in + c_in
        norm = (1.0 / np.maximum(total, 1e-3)).astype(np.float32)
        g_in, w_in, c_in = g_in * norm, w_in * norm, c_in * norm
        c_in[total < 1e-3] = 1.0
        gm, wm, csf = (self._scatter(v, inside) for v in (g_in, w_in, c_in))

        # --- subject's tissue parameters ---------------------------------------------------------------
        # a subject-wide factor (field strength, temperature, age) plus a smaller per-tissue one, so tissue
        # contrasts vary between subjects but keep their sign (GM stays darker than WM on T1)
        sds = np.array([T1_T2_JITTER_SD, T1_T2_JITTER_SD, PD_JITTER_SD])
        common = rng.normal(0.0, sds)
        tissues: Dict[str, Tissue] = {}
        for name in TISSUES:
            t = TISSUE_TABLE[name]
            j = np.exp(common + rng.normal(0.0, TISSUE_JITTER_FRACTION * sds))
            tissues[name] = Tissue(t1=t.t1 * j[0], t2=t.t2 * j[1], pd=t.pd * j[2])
        texture = np.exp(TEXTURE_SD * smooth_field(rng, self.shape, TEXTURE_CONTROL_MM * scale / c.spacing))
        bias_control = BIAS_CONTROL_MM * scale / c.spacing
        shared_bias = BIAS_SD_SHARED * smooth_field(rng, self.shape, bias_control)
        origin_jitter = rng.normal(0.0, ORIGIN_SD_MM, 3)

        # --- tumour -------------------------------------------------------------------------------------
        fractions: Dict[str, np.ndarray] = {"CSF": csf, "GM": gm, "WM": wm}
        label = np.zeros(self.shape, dtype=np.uint8)
        centre = None
        gd = 0.0
        if rng.random() < DEMO_TUMOUR_PROBABILITY:
            centre, gd = self._add_tumour(rng, fractions, label, mask)

        # --- sequences -----------------------------------------------------------------------------------
        flat = {k: v.reshape(-1)[inside] for k, v in fractions.items()}
        texture_in = texture.reshape(-1)[inside]
        shared_in = shared_bias.reshape(-1)[inside]
        images: Dict[str, np.ndarray] = {}
        gains: Dict[str, float] = {}
        biases: Dict[str, np.ndarray] = {}
        n_in = inside.size
        for name in seqs:
            rs = np.random.default_rng([c.seed, case_index, 1 + SEQUENCE_CODES[name]])
            sig = mix_signal(SEQUENCE_TABLE[name], flat, tissues, gd_concentration=gd, pd_modulation=texture_in)
            bias_field = smooth_field(rs, self.shape, bias_control).reshape(-1)[inside]
            bias = np.exp(shared_in + np.float32(BIAS_SD_PER_SEQUENCE) * bias_field)
            sig *= bias
            sigma = np.float32(rs.uniform(*NOISE_FRACTION_RANGE) * float(sig.mean()) if n_in else 0.0)
            n1 = rs.standard_normal(n_in, dtype=np.float32)
            n2 = rs.standard_normal(n_in, dtype=np.float32)
            gain = float(10.0 ** rs.uniform(*GAIN_LOG10_RANGE))
            values = np.sqrt((sig + sigma * n1) ** 2 + (sigma * n2) ** 2) * np.float32(gain)
            # a voxel of the brain is never exactly 0, so crop-to-nonzero keeps the whole brain
            values[values <= 0] = np.float32(1e-3 * gain * max(float(sigma), 1e-6))
            images[name] = self._scatter(values, inside)
            gains[name] = gain
            biases[name] = self._scatter(bias, inside, fill=1.0)

        origin = self._centre_xyz - self._c_out[::-1] * c.spacing + origin_jitter
        geometry = Geometry(spacing=(c.spacing,) * 3, origin=tuple(float(np.round(v, 4)) for v in origin),
                            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape=self.shape)
        return SimulatedCase(index=case_index, images=images, label=label, fractions=fractions, mask=mask,
                             gains=gains, bias=biases, geometry=geometry, tumour_centre=centre)

    def _scatter(self, values: np.ndarray, inside: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Put brain-voxel values back on the full grid (``fill`` elsewhere), float32."""
        out = np.full(self.shape, fill, dtype=np.float32)
        out.reshape(-1)[inside] = values
        return out

    # ------------------------------------------------------------------------------------------------
    def _add_tumour(self, rng: np.random.Generator, fractions: Dict[str, np.ndarray], label: np.ndarray,
                    mask: np.ndarray) -> Tuple[Optional[Tuple[int, int, int]], float]:
        """Place a tumour (ET rim around an NCR core, ED around both) in deep WM; edit fractions and label.

        Returns (centre voxel, gadolinium concentration in the enhancing rim).
        """
        c = self.config
        gm, wm, csf = fractions["GM"], fractions["WM"], fractions["CSF"]
        radius = rng.uniform(*TUMOUR_RADIUS_MM) * c.size_scale
        radii = radius * np.exp(rng.normal(0.0, TUMOUR_ELONGATION_SD, 3))
        necrotic = radius / c.size_scale > NECROSIS_MIN_RADIUS_MM and rng.random() < NECROSIS_PROBABILITY
        ncr_frac = rng.uniform(*NECROSIS_FRACTION)
        ed_factor = rng.uniform(*OEDEMA_FACTOR)
        gd = float(rng.uniform(*GD_CONCENTRATION_MM))
        pick = rng.random()

        # candidate centres: white matter well inside the brain
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0)
        mid, half = (lo + hi) / 2.0, np.maximum((hi - lo) / 2.0, 1.0)
        z, y, x = (np.arange(n)[:, None, None] if k == 0 else np.arange(n)[None, :, None] if k == 1 else
                   np.arange(n)[None, None, :] for k, n in enumerate(self.shape))
        inner = ((z - mid[0]) / half[0]) ** 2 + ((y - mid[1]) / half[1]) ** 2 + ((x - mid[2]) / half[2]) ** 2
        cand = np.flatnonzero((wm > 0.6) & (inner < 0.55 ** 2))
        if cand.size == 0:
            return None, 0.0
        centre = np.array(np.unravel_index(cand[int(pick * cand.size)], self.shape))

        extent = int(np.ceil(radius * np.exp(3 * TUMOUR_ELONGATION_SD) * ed_factor * 1.3 / c.spacing)) + 2
        blo = np.maximum(centre - extent, 0)
        bhi = np.minimum(centre + extent + 1, self.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(blo, bhi))
        bshape = tuple(int(b - a) for a, b in zip(blo, bhi))
        zz, yy, xx = (np.arange(a, b, dtype=np.float32) for a, b in zip(blo, bhi))
        d2 = (((zz[:, None, None] - centre[0]) * c.spacing / radii[0]) ** 2
              + ((yy[None, :, None] - centre[1]) * c.spacing / radii[1]) ** 2
              + ((xx[None, None, :] - centre[2]) * c.spacing / radii[2]) ** 2)
        noise = smooth_field(rng, bshape, max(0.6 * radius / c.spacing, 1.5))
        r = np.sqrt(d2) * np.exp(TUMOUR_IRREGULARITY * noise)
        width = 0.5 * c.spacing / radius
        m = mask[sl]
        g, w, f = gm[sl], wm[sl], csf[sl]
        core = _soft_step(1.0 - r, width) * m
        ncr = _soft_step(ncr_frac - r, width) * m if necrotic else np.zeros_like(core)
        wm_rel = w / np.maximum(g + w, 1e-3)
        ed_rel = _soft_step(ed_factor * (0.55 + 0.45 * wm_rel) - r, width) * m
        keep = 1.0 - core
        ed = keep * (g + w) * ed_rel
        lab = np.zeros(bshape, dtype=np.uint8)
        lab[(ed_rel > 0.5) & (g + w > 0.5) & m] = DEMO_LABELS["ED"]
        lab[(core > 0.5) & m] = DEMO_LABELS["ET"]
        lab[(ncr > 0.5) & m] = DEMO_LABELS["NCR"]
        g *= keep * (1.0 - ed_rel)
        w *= keep * (1.0 - ed_rel)
        f *= keep
        for name, values in (("ED", ed), ("NCR", ncr), ("ET", core - ncr)):
            full = np.zeros(self.shape, dtype=np.float32)
            full[sl] = values
            fractions[name] = full
        label[sl] = lab
        return (int(centre[0]), int(centre[1]), int(centre[2])), gd


# ----------------------------------------------------------------------------------------------------
def plan_availability(config: DemoConfig) -> List[Tuple[str, ...]]:
    """Which sequences each training case keeps.

    ``random``: each sequence is missing independently with probability ``missing``, redrawn until the
    case keeps at least two. ``chain``: case k holds one consecutive pair of the sequence list, cycling
    through the pairs, so e.g. T1 and Flair never meet (an unpaired setting).
    """
    c = config
    rng = np.random.default_rng([c.seed, 7_777_777])
    seqs = c.sequences
    out: List[Tuple[str, ...]] = []
    if c.pairing == "chain":
        pairs = [(seqs[i], seqs[i + 1]) for i in range(len(seqs) - 1)]
        start = int(rng.integers(len(pairs)))
        return [pairs[(k + start) % len(pairs)] for k in range(c.num_cases)]
    need = min(DEMO_MIN_SEQUENCES_PER_CASE, len(seqs))
    for _ in range(c.num_cases):
        while True:
            keep = rng.random(len(seqs)) >= c.missing
            if keep.sum() >= need:
                break
        out.append(tuple(s for s, k in zip(seqs, keep) if k))
    return out


def _resolve_target(output_folder: Optional[PathLike], dataset: Union[int, str], name: Optional[str]) -> Path:
    text = str(dataset).strip()
    if dataset_name_from_folder(text) is not None:
        did = dataset_name_from_folder(text)
        dname = text.split("_", 1)[1]
        if name is not None and name != dname:
            raise NnsynthError(f"-d {text} and --name {name} disagree; give one of them")
    elif text.isdigit():
        did, dname = int(text), (name or DEMO_DATASET_NAME)
    else:
        raise NnsynthError(f"{text!r} is neither a dataset id (e.g. 501) nor a name (e.g. Dataset501_BrainDemo)")
    folder_name = make_dataset_name(int(did), dname)  # type: ignore[arg-type]
    if output_folder is not None:
        return Path(output_folder)
    root = raw_folder()
    if root.is_dir():
        clash = [p.name for p in root.iterdir() if p.is_dir() and p.name != folder_name
                 and dataset_name_from_folder(p.name) == did]
        if clash:
            raise NnsynthError(f"Dataset id {did:03d} is already used by {', '.join(clash)} in {root}; choose "
                               f"another id (-d) or remove that folder")
    return root / folder_name


def make_demo_dataset(output_folder: Optional[PathLike] = None, dataset: Union[int, str] = DEMO_DATASET_ID,
                      name: Optional[str] = None, *, num_cases: int = DEMO_NUM_CASES,
                      num_test_cases: int = DEMO_NUM_TEST_CASES, spacing: float = DEMO_SPACING,
                      sequences: Sequence[str] = DEMO_SEQUENCES, missing: float = DEMO_MISSING_RATE,
                      pairing: str = "random", seed: int = DEMO_SEED, size_scale: float = 1.0,
                      overwrite: bool = False, montage: bool = True, progress: bool = True) -> Path:
    """Write a simulated raw dataset (CONTRACT.md section 2) and return its folder.

    ``output_folder`` is the dataset folder itself; without it the folder is
    ``$nnSynth_raw/DatasetXXX_Name`` from ``dataset`` (id or ``DatasetXXX_Name``) and ``name``.
    Small and fast for tests: ``spacing=4, size_scale=0.5`` gives 24x27x22 voxels (6 cases in ~0.2 s
    without the montage); ``spacing=4`` alone 45x52x42.
    The dataset is built in a hidden sibling folder and moved into place at the end, so an interrupted
    run never leaves a half-written dataset; an existing folder is replaced only with ``overwrite``.
    """
    config = DemoConfig(num_cases=num_cases, num_test_cases=num_test_cases, spacing=spacing,
                        sequences=tuple(sequences), missing=missing, pairing=pairing, seed=seed,
                        size_scale=size_scale).validated()
    target = _resolve_target(output_folder, dataset, name)
    case_prefix = name or (target.name.split("_", 1)[1] if dataset_name_from_folder(target.name) is not None
                           else DEMO_DATASET_NAME)
    if target.exists() and not overwrite:
        raise NnsynthError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    if config.pairing == "chain" and config.missing != DEMO_MISSING_RATE:
        logger.info("--pairing chain: every training case holds exactly two sequences; --missing is ignored")
    if len(config.sequences) == 2 and config.pairing == "random" and config.missing > 0:
        logger.info("Only two sequences: training cases keep both (at least %d per case)",
                    DEMO_MIN_SEQUENCES_PER_CASE)

    t0 = time.perf_counter()
    gen = DemoGenerator(config)
    availability = plan_availability(config)
    total = config.num_cases + config.num_test_cases
    width = max(3, len(str(total - 1)))
    names = [f"{case_prefix}_{i:0{width}d}" for i in range(total)]
    logger.info("Writing %s: %d training + %d test cases, sequences %s, %s voxels at %.3g mm, seed %d",
                target, config.num_cases, config.num_test_cases, ",".join(config.sequences),
                "x".join(map(str, gen.shape)), config.spacing, config.seed)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    channel = {s: i for i, s in enumerate(config.sequences)}
    folders = {k: tmp / k for k in ("imagesTr", "labelsTr")}
    if config.num_test_cases:
        folders.update({k: tmp / k for k in ("imagesTs", DEMO_LABELS_TS_FOLDER, DEMO_TRUTH_FOLDER)})
    for f in folders.values():
        f.mkdir(parents=True)
    montage_rows: List[Tuple[str, Dict[str, np.ndarray], np.ndarray]] = []
    montage_from_test = config.num_test_cases > 0
    try:
        from tqdm import tqdm
        for i in tqdm(range(total), desc="demo cases", unit="case", disable=progress_disabled(progress)):
            train = i < config.num_cases
            present = availability[i] if train else config.sequences
            case = gen.simulate(i, present)
            for s in present:
                fname = image_filename(names[i], channel[s], FILE_ENDING)
                write_image(case.images[s], case.geometry, folders["imagesTr" if train else "imagesTs"] / fname)
                if not train:
                    shutil.copyfile(folders["imagesTs"] / fname, folders[DEMO_TRUTH_FOLDER] / fname)
            write_image(case.label, case.geometry,
                        folders["labelsTr" if train else DEMO_LABELS_TS_FOLDER] / f"{names[i]}{FILE_ENDING}",
                        dtype=np.uint8)
            if montage and len(montage_rows) < 4 and train != montage_from_test:
                zc = case.tumour_centre[0] if case.tumour_centre else gen.shape[0] // 2
                montage_rows.append((names[i], {s: case.images[s][zc] for s in present}, case.label[zc]))
        save_json(_dataset_json(config, target.name, names), tmp / DATASET_JSON)
        if montage:
            write_montage(montage_rows, config.sequences, tmp / DEMO_MONTAGE)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {s: sum(s in a for a in availability) for s in config.sequences}
    logger.info("Done in %.1f s: %s (training cases per sequence: %s)", time.perf_counter() - t0, target,
                ", ".join(f"{k}={v}" for k, v in counts.items()))
    return target


def _dataset_json(config: DemoConfig, folder_name: str, names: List[str]) -> dict:
    return {
        "channel_names": {str(i): s for i, s in enumerate(config.sequences)},
        "labels": dict(DEMO_LABELS),
        "numTraining": config.num_cases,
        "file_ending": FILE_ENDING,
        "name": folder_name,
        "description": ("Simulated multi-sequence brain MRI (nnsynth demo): MNI ICBM152 2009a anatomy, random "
                        "deformation, tumours (NCR/ED/ET), signal equations with per-subject relaxation times, "
                        "bias field, Rician noise and per-sequence scanner gain. Training cases miss sequences "
                        f"({config.pairing} pairing); test cases are complete and their truth is in "
                        f"{DEMO_TRUTH_FOLDER}/ and {DEMO_LABELS_TS_FOLDER}/."),
        "reference": ("Anatomy: MNI ICBM 152 non-linear 2009a template, McConnell Brain Imaging Centre, "
                      "Montreal Neurological Institute, McGill University (Fonov et al., NeuroImage 2009, "
                      "2011); see nnsynth/dataset/demo/assets/NOTICE.txt"),
        "licence": "Simulated data; the anatomy follows the ICBM 152 copyright notice (NOTICE.txt)",
        "numTest": config.num_test_cases,
        "demo_generator": {"seed": config.seed, "spacing": config.spacing, "size_scale": config.size_scale,
                           "missing": config.missing, "pairing": config.pairing,
                           "test_cases": names[config.num_cases:]},
    }


def write_montage(rows: List[Tuple[str, Dict[str, np.ndarray], np.ndarray]], sequences: Sequence[str],
                  path: Path) -> None:
    """PNG of a few cases (rows) x sequences + label overlay (columns), axial slice through the tumour.

    Radiological display: patient's left on the image's right, anterior at the top.
    """
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    overlay_on = "Flair" if "Flair" in sequences else sequences[-1]
    cols = list(sequences) + ["labels"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.9 * len(cols), 2.2 * len(rows)), squeeze=False)
    cmap = ListedColormap([LABEL_COLOURS[k] for k in (1, 2, 3)])
    for r, (case, slices, lab) in enumerate(rows):
        for cidx, col in enumerate(cols):
            ax = axes[r, cidx]
            ax.set_axis_off()
            src = overlay_on if col == "labels" else col
            img = slices.get(src)
            if img is None:
                ax.set_title(f"{col}: missing", fontsize=7)
                continue
            nz = img[img > 0]
            # display window from the slice's own brain percentiles, as a viewer would auto-window
            vmin, vmax = (float(v) for v in np.percentile(nz, (0.5, 99.5))) if nz.size else (0.0, 1.0)
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if col == "labels":
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0.5, vmax=3.5, alpha=0.55,
                          interpolation="nearest")
                ax.set_title(f"{overlay_on} + NCR/ED/ET", fontsize=7)
            else:
                ax.set_title(col, fontsize=8)
            if cidx == 0:
                ax.text(-0.05, 0.5, case, transform=ax.transAxes, rotation=90, va="center", ha="right",
                        fontsize=7)
    fig.suptitle("nnsynth demo dataset (red NCR, green ED, yellow ET)", fontsize=9)
    fig.tight_layout()
    from nnsynth.utils.files import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
