"""Regenerate the anatomy assets shipped in ``nnsynth/dataset/demo/assets/`` from nilearn's copy of the
MNI ICBM152 2009a (symmetric) template.

Why a script: nnsynth must build its demo dataset without nilearn and without the network, so a small,
derived copy of the template travels inside the package. This script documents exactly how that copy is
made and rebuilds the same arrays (given the same nilearn release; the zip container's timestamps differ).

Run (nilearn is a development-only dependency)::

    pip install nilearn
    python benchmarks/make_demo_assets.py [--out nnsynth/dataset/demo/assets]

What it writes: ``mni152_2mm.npz`` holding, on a 2 mm isotropic grid in LPS orientation with identity
direction (SimpleITK array order z, y, x), cropped to the brain's bounding box plus a margin:

- ``t1``: the T1-weighted template, uint8 (0-255 scaled),
- ``gm``, ``wm``: tissue probability maps, uint8 (probability x 255), renormalised so that GM + WM + CSF = 1
  inside the mask. CSF is not shipped by nilearn; it is ``brain mask - GM - WM`` (clipped), which captures
  ventricles and sulci, and is not stored: the generator recomputes it as ``mask - GM - WM`` (saves a
  third of the file),
- ``mask``: the brain mask (nilearn's ``load_mni152_brain_mask`` threshold 0.2), holes filled, uint8,
- ``spacing`` (mm) and ``origin`` (LPS mm of voxel [0, 0, 0]) as float64 arrays.

Down-sampling from 1 mm to 2 mm is a 2x2x2 block average (an area average, so partial volume is
preserved), not nilearn's point resampling.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("make_demo_assets")

MARGIN_VOXELS = 4      # free voxels around the brain at 2 mm so that deformed brains stay inside the grid
BLOCK = 2              # 1 mm -> 2 mm

NOTICE_HEADER = """\
Anatomy asset of the nnsynth demo dataset generator
===================================================

File: mni152_2mm.npz

Derived from the MNI ICBM 152 non-linear 2009 atlas, release a, as redistributed (skull-stripped and
converted to uint8 by nilearn) inside the nilearn {nilearn_version} wheel:
nilearn/datasets/data/mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz.
Source: McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University,
http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009

Derivation (benchmarks/make_demo_assets.py): 2x2x2 block average to 2 mm, reoriented to LPS, cropped to
the brain bounding box plus {margin} voxels, quantised to uint8 (T1, GM, WM, mask); the generator
derives CSF = brain mask - GM - WM.

nilearn's wheel does not ship a licence file next to the template (its description says "License:
unknown"); the notice below is the copyright and permission notice that the McConnell Brain Imaging
Centre distributes with the ICBM 152 2009 atlases, reproduced as the notice requires.

References:
  VS Fonov, AC Evans, RC McKinstry, CR Almli, DL Collins. Unbiased nonlinear average age-appropriate
  brain templates from birth to adulthood. NeuroImage 47, Supplement 1 (2009) S102.
  VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG. Unbiased average
  age-appropriate atlases for pediatric studies. NeuroImage 54(1) (2011) 313-327.
  DL Collins, AP Zijdenbos, WFC Baare, AC Evans. ANIMAL+INSECT: Improved cortical structure segmentation.
  IPMI 1999, LNCS 1613, 210-223.

Copyright notice
----------------
"""

MNI_NOTICE = """\
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation
for any purpose and without fee is hereby granted, provided that the above copyright notice appear in
all copies. The authors and McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or implied warranty. The authors are
not responsible for any data loss, equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.
"""


def _to_lps_array(nifti_image, tmp: Path, name: str):
    """Write a nibabel image, read it with SimpleITK and reorient to LPS (identity direction)."""
    import nibabel as nib
    import SimpleITK as sitk

    path = tmp / f"{name}.nii.gz"
    nib.save(nifti_image, str(path))
    image = sitk.DICOMOrient(sitk.ReadImage(str(path), sitk.sitkFloat32), "LPS")
    if not np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6):
        raise RuntimeError(f"{name}: could not reorient to identity direction ({image.GetDirection()})")
    return sitk.GetArrayFromImage(image).astype(np.float64), np.array(image.GetOrigin()), \
        np.array(image.GetSpacing())


def _block_mean(a: np.ndarray, block: int) -> np.ndarray:
    pad = [(0, (-s) % block) for s in a.shape]
    a = np.pad(a, pad)
    z, y, x = (s // block for s in a.shape)
    return a.reshape(z, block, y, block, x, block).mean(axis=(1, 3, 5))


def build(out_folder: Path) -> Path:
    import nilearn
    from nilearn import datasets
    from scipy import ndimage

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t1, origin, spacing = _to_lps_array(datasets.load_mni152_template(resolution=1), tmp_path, "t1")
        gm, _, _ = _to_lps_array(datasets.load_mni152_gm_template(resolution=1), tmp_path, "gm")
        wm, _, _ = _to_lps_array(datasets.load_mni152_wm_template(resolution=1), tmp_path, "wm")
        mask, _, _ = _to_lps_array(datasets.load_mni152_brain_mask(resolution=1), tmp_path, "mask")
    if not np.allclose(spacing, 1.0):
        raise RuntimeError(f"expected the 1 mm template, got spacing {spacing}")

    def unit(a: np.ndarray) -> np.ndarray:
        return np.clip(a / max(float(a.max()), 1e-6), 0.0, 1.0)

    t1, gm, wm = unit(t1), unit(gm), unit(wm)
    mask = ndimage.binary_fill_holes(mask > 0.5)
    gm, wm = gm * mask, wm * mask
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # 1 mm -> 2 mm area average; voxel centre of the first 2 mm voxel sits half a millimetre further
    t1, gm, wm, csf, mask_f = (_block_mean(a, BLOCK) for a in (t1, gm, wm, csf, mask.astype(np.float64)))
    origin = origin + 0.5 * (BLOCK - 1) * spacing
    spacing = spacing * BLOCK
    mask2 = ndimage.binary_fill_holes(mask_f >= 0.5)
    # fractions renormalised inside the 2 mm mask so they sum to one where the brain is
    total = gm + wm + csf
    safe = np.where(total > 1e-6, total, 1.0)
    gm, wm, csf = (np.where(mask2, f / safe, 0.0) for f in (gm, wm, csf))
    csf = np.where(mask2 & (total <= 1e-6), 1.0, csf)
    t1 = t1 * mask2

    idx = np.argwhere(mask2)
    lo = np.maximum(idx.min(0) - MARGIN_VOXELS, 0)
    hi = np.minimum(idx.max(0) + 1 + MARGIN_VOXELS, mask2.shape)
    pads = [(max(0, MARGIN_VOXELS - int(idx.min(0)[d])), max(0, int(idx.max(0)[d]) + 1 + MARGIN_VOXELS - mask2.shape[d]))
            for d in range(3)]
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def crop(a: np.ndarray) -> np.ndarray:
        return np.pad(a[sl], pads)

    # array order (z, y, x) -> physical order (x, y, z) for the origin shift
    origin = origin + (lo[::-1] - np.array([p[0] for p in pads])[::-1]) * spacing

    def q(a: np.ndarray) -> np.ndarray:
        return np.round(np.clip(crop(a), 0.0, 1.0) * 255.0).astype(np.uint8)

    out_folder.mkdir(parents=True, exist_ok=True)
    npz = out_folder / "mni152_2mm.npz"
    np.savez_compressed(npz, t1=q(t1), gm=q(gm), wm=q(wm), mask=crop(mask2).astype(np.uint8),
                        spacing=spacing.astype(np.float64), origin=origin.astype(np.float64))
    (out_folder / "NOTICE.txt").write_text(
        NOTICE_HEADER.format(nilearn_version=nilearn.__version__, margin=MARGIN_VOXELS) + MNI_NOTICE)
    logger.info("wrote %s (%.0f KiB), shape %s, spacing %s, origin %s", npz, npz.stat().st_size / 1024,
                crop(mask2).shape, spacing, np.round(origin, 2))
    return npz


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    default = Path(__file__).resolve().parents[1] / "nnsynth" / "dataset" / "demo" / "assets"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default, help="assets folder (default: %(default)s)")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
