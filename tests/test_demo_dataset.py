"""The built-in demo dataset generator: format, missingness, determinism and MR contrast sanity.

Volumes are tiny (spacing 4 mm and/or a shrunken head) so the whole module runs in seconds.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from nnsynth.cli.make_demo import cli
from nnsynth.constants import DEMO_LABELS_TS_FOLDER, DEMO_TRUTH_FOLDER
from nnsynth.dataset.cases import discover_cases
from nnsynth.dataset.dataset_json import load_dataset_spec
from nnsynth.dataset.demo import DemoConfig, DemoGenerator, make_demo_dataset
from nnsynth.dataset.demo.anatomy import SEQUENCE_TABLE, TISSUE_TABLE, load_template, mix_signal
from nnsynth.dataset.demo.generator import plan_availability
from nnsynth.dataset.io import read_header, read_image
from nnsynth.exceptions import NnsynthError

TINY = ["--spacing", "4", "--size-scale", "0.5"]


def _tiny(folder: Path, **kw) -> Path:
    args = dict(num_cases=4, num_test_cases=2, spacing=4.0, size_scale=0.5, montage=False, progress=False)
    args.update(kw)
    return make_demo_dataset(folder, **args)


def test_cli_end_to_end(nnsynth_folders):
    rc = cli(["-d", "502", "--cases", "6", "--test-cases", "2", "--seed", "3", *TINY])
    assert rc == 0
    ds = nnsynth_folders["raw"] / "Dataset502_BrainDemo"
    spec = load_dataset_spec(ds)
    assert spec.sequences == ["T1", "T1Gd", "T2", "Flair"]
    assert spec.labels == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    assert spec.num_training == 6 and spec.file_ending == ".nii.gz"
    raw = json.loads((ds / "dataset.json").read_text())
    assert "description" in raw and "reference" in raw
    assert (ds / "montage.png").stat().st_size > 1000

    problems: list = []
    train = discover_cases(ds / "imagesTr", spec, ds / "labelsTr", problems=problems)
    test = discover_cases(ds / "imagesTs", spec, problems=problems)
    assert not problems
    assert list(train) == [f"BrainDemo_{i:03d}" for i in range(6)]
    assert list(test) == ["BrainDemo_006", "BrainDemo_007"]           # test cases continue numbering
    for name, case in train.items():
        assert len(case.images) >= 2 and case.label is not None
    for name, case in test.items():
        assert sorted(case.images) == [0, 1, 2, 3]                     # test cases are complete
        assert (ds / DEMO_LABELS_TS_FOLDER / f"{name}.nii.gz").is_file()
        for cid, p in case.images.items():
            truth = ds / DEMO_TRUTH_FOLDER / p.name
            assert truth.read_bytes() == p.read_bytes()

    for case in list(train.values()) + list(test.values()):
        headers = [read_header(p) for p in case.images.values()]
        label_path = case.label or ds / DEMO_LABELS_TS_FOLDER / f"{case.name}.nii.gz"
        headers.append(read_header(label_path))
        assert all(h == headers[0] for h in headers)                   # one geometry per case
        g = headers[0]
        assert g.spacing == (4.0, 4.0, 4.0)
        assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert np.abs(g.origin).max() > 10.0                          # a realistic, non-zero origin
        masks = []
        for p in case.images.values():
            arr, _ = read_image(p, dtype=None)
            assert arr.dtype == np.float32 and np.isfinite(arr).all()
            masks.append(arr != 0)
            # skull-stripped: exactly zero around the brain, so crop-to-nonzero works
            assert arr[0].max() == 0 and arr[-1].max() == 0 and arr[:, :, 0].max() == 0
            assert 0.15 < (arr == 0).mean() < 0.85
        assert all((m == masks[0]).all() for m in masks)               # same brain mask in every sequence
        lab, _ = read_image(label_path, dtype=None)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2, 3}
        assert not lab[~masks[0]].any()


def test_refuses_to_overwrite_and_overwrites(nnsynth_folders):
    args = ["-d", "503", "--cases", "2", "--test-cases", "0", "--no-montage", *TINY]
    assert cli(args) == 0
    ds = nnsynth_folders["raw"] / "Dataset503_BrainDemo"
    (ds / "stale.txt").write_text("old")
    assert cli(args) != 0
    assert (ds / "stale.txt").exists()
    assert cli(args + ["--overwrite", "--seed", "9"]) == 0
    assert not (ds / "stale.txt").exists() and (ds / "dataset.json").is_file()
    assert not [p for p in ds.parent.iterdir() if p.name.startswith(".")]   # no temporary leftovers


def test_unknown_sequence_is_a_clear_error(nnsynth_folders, caplog):
    assert cli(["-d", "504", "--sequences", "T1,DWI", *TINY]) != 0
    with pytest.raises(NnsynthError) as e:
        _tiny(nnsynth_folders["raw"] / "x", sequences=["T1", "DWI"])
    for valid in ("T1", "T1Gd", "T2", "Flair", "PD"):
        assert valid in str(e.value)
    assert "DWI" in str(e.value)
    assert not (nnsynth_folders["raw"] / "x").exists()


def test_sequence_subset_and_order(tmp_path):
    ds = _tiny(tmp_path / "ds", sequences=["pd", "Flair", "t2"], num_test_cases=1)
    spec = load_dataset_spec(ds)
    assert spec.sequences == ["PD", "Flair", "T2"]


def test_missing_rate_and_minimum_two_sequences(tmp_path):
    cfg = DemoConfig(num_cases=400, missing=0.25).validated()
    avail = plan_availability(cfg)
    assert all(len(a) >= 2 for a in avail)
    rate = 1.0 - sum(len(a) for a in avail) / (400 * 4)
    # independent draws, redrawn when fewer than 2 remain: expected rate about 0.22
    assert 0.17 < rate < 0.27
    assert plan_availability(DemoConfig(num_cases=50, missing=0.0).validated()) == [cfg.sequences] * 50
    # the written dataset follows the plan
    ds = _tiny(tmp_path / "ds", num_cases=12, num_test_cases=0, missing=0.5, seed=5)
    spec = load_dataset_spec(ds)
    cases = discover_cases(ds / "imagesTr", spec)
    planned = plan_availability(DemoConfig(num_cases=12, missing=0.5, seed=5).validated())
    assert [tuple(c.sequences(spec)) for c in cases.values()] == planned
    assert sum(len(c.images) for c in cases.values()) < 12 * 4


def test_chain_pairing_never_pairs_t1_with_flair(tmp_path):
    avail = plan_availability(DemoConfig(num_cases=30, pairing="chain").validated())
    assert set(avail) == {("T1", "T1Gd"), ("T1Gd", "T2"), ("T2", "Flair")}
    ds = _tiny(tmp_path / "ds", num_cases=6, pairing="chain")
    spec = load_dataset_spec(ds)
    for case in discover_cases(ds / "imagesTr", spec).values():
        seqs = case.sequences(spec)
        assert len(seqs) == 2 and not {"T1", "Flair"} <= set(seqs)
    for case in discover_cases(ds / "imagesTs", spec).values():
        assert len(case.images) == 4


def test_deterministic_for_a_seed(tmp_path):
    a = _tiny(tmp_path / "a", seed=11)
    b = _tiny(tmp_path / "b", seed=11)
    c = _tiny(tmp_path / "c", seed=12)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    differs = False
    for rel in files:
        x, gx = read_image(a / rel, dtype=None)
        y, gy = read_image(b / rel, dtype=None)
        assert gx == gy and x.tobytes() == y.tobytes(), rel
        if (c / rel).exists():
            z, _ = read_image(c / rel, dtype=None)
            differs |= z.shape != x.shape or not np.array_equal(z, x)
    assert differs


def test_case_does_not_depend_on_other_sequences():
    gen_all = DemoGenerator(DemoConfig(spacing=4.0, size_scale=0.6))
    gen_two = DemoGenerator(DemoConfig(spacing=4.0, size_scale=0.6, sequences=("Flair", "T2")))
    full = gen_all.simulate(3)
    part = gen_two.simulate(3, ["T2"])
    assert np.array_equal(full.images["T2"], part.images["T2"])
    assert np.array_equal(full.label, part.label)


def _means(case, seq, tissue_masks):
    # undo the scanner gain and the (known) bias field, as a bias-corrected, normalised image would be
    img = case.images[seq] / case.gains[seq] / case.bias[seq]
    return {k: float(img[m].mean()) for k, m in tissue_masks.items() if m.sum() >= 5}


def test_mr_contrasts_are_plausible():
    """Real numbers from the simulated images and their tissue/label maps."""
    gen = DemoGenerator(DemoConfig(spacing=3.0, sequences=("T1", "T1Gd", "T2", "Flair", "PD")))
    checked_tumour = 0
    for i in range(4):
        case = gen.simulate(i)
        pure = {k: (v > 0.9) & case.mask for k, v in case.fractions.items() if k in ("CSF", "GM", "WM")}
        t1, t2, fl = (_means(case, s, pure) for s in ("T1", "T2", "Flair"))
        assert t1["CSF"] < t1["GM"] < t1["WM"]          # T1: CSF dark, GM darker than WM
        assert t2["CSF"] > t2["GM"] > t2["WM"]          # T2: CSF bright, GM brighter than WM
        assert fl["CSF"] < 0.5 * fl["WM"] and fl["GM"] > fl["WM"]   # FLAIR: CSF nulled
        if case.label.max() == 0:
            continue
        lab = {"ET": case.label == 3, "ED": case.label == 2, "WM": pure["WM"] & (case.label == 0)}
        r = {s: _means(case, s, lab) for s in ("T1", "T1Gd", "T2", "Flair")}
        if "ET" in r["T1"]:
            # enhancement only after contrast
            assert r["T1Gd"]["ET"] / r["T1Gd"]["WM"] > 1.5 * r["T1"]["ET"] / r["T1"]["WM"]
            assert r["T1"]["ET"] < r["T1"]["WM"]
        if "ED" in r["T2"]:
            assert r["T2"]["ED"] > 1.5 * r["T2"]["WM"] and r["Flair"]["ED"] > 1.3 * r["Flair"]["WM"]
        checked_tumour += 1
    assert checked_tumour >= 2


def test_written_intensities_differ_in_scale_and_enhance_on_t1gd(tmp_path):
    ds = _tiny(tmp_path / "ds", num_cases=1, num_test_cases=4, spacing=4.0, size_scale=1.0, seed=4)
    spec = load_dataset_spec(ds)
    medians, enhanced = [], 0
    for case in discover_cases(ds / "imagesTs", spec).values():
        lab, _ = read_image(ds / DEMO_LABELS_TS_FOLDER / f"{case.name}.nii.gz", dtype=None)
        imgs = {spec.channel_names[c]: read_image(p)[0] for c, p in case.images.items()}
        brain = imgs["T1"] != 0
        medians.append([float(np.median(imgs[s][brain])) for s in spec.sequences])
        if (lab == 3).sum() >= 5:
            rel = {s: imgs[s][lab == 3].mean() / np.median(imgs[s][brain & (lab == 0)]) for s in ("T1", "T1Gd")}
            assert rel["T1Gd"] > 1.5 * rel["T1"]
            enhanced += 1
    assert enhanced >= 1
    medians = np.array(medians)
    # scanner gain: the same sequence has very different scales across cases, so normalisation matters
    assert (medians.max(0) / medians.min(0)).max() > 3.0


def test_signal_model_reproduces_the_template_t1():
    """The T1 signal equation applied to the template's tissue maps matches the real T1 template."""
    tpl = load_template()
    fr = {"CSF": tpl.csf, "GM": tpl.gm, "WM": tpl.wm}
    sim = mix_signal(SEQUENCE_TABLE["T1"], fr, TISSUE_TABLE)
    m = tpl.mask > 0
    r = np.corrcoef(sim[m], tpl.t1[m])[0, 1]
    assert r > 0.8


def test_tiny_dataset_is_fast(tmp_path):
    load_template()   # the one-off asset load is shared by all datasets of a process
    t0 = time.perf_counter()
    ds = _tiny(tmp_path / "ds", num_cases=4, num_test_cases=2, montage=True)
    elapsed = time.perf_counter() - t0
    shape = read_header(next((ds / "imagesTr").iterdir())).shape
    assert max(shape) <= 30
    assert elapsed < (4.0 if os.environ.get("CI") else 6.0), elapsed
