"""Availability-aware sampling, patch geometry and the augmentation contract (spatial on both, intensity on input)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_process import run_in_own_session
from test_training_engine import make_preprocessed, tiny_plans
from nnsynth.training.dataloading import (DEFAULT_AUGMENTATION, BiasFieldTransform, CaseStore, SynthesisSampler,
                                          build_augmentation, build_intensity_augmentation, fixed_validation_batches,
                                          read_box, without_source_brightness)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    # case 0 lacks T1Gd and Flair, case 1 has T2 only, the rest are complete
    pre = make_preprocessed(root, n_cases=3, availability={0: (True, False, True, False), 1: (False, False, True, False)})
    return CaseStore(pre / "nnsynthPlans_2d", ["case_000", "case_001", "case_002"])


def test_never_samples_a_missing_sequence(store):
    sampler = SynthesisSampler(store, store.names, [32, 32], 2, 3, batch_size=8, seed=1)
    seen = {name: set() for name in store.names}
    for _ in range(40):
        b = sampler.next_batch()
        for case, s, t in zip(b["cases"], b["source_idx"].tolist(), b["target_idx"].tolist()):
            seen[case].update({("s", s), ("t", t)})
            assert s in store.cases[case].available and t in store.cases[case].available
    assert seen["case_001"] == {("s", 2), ("t", 2)}  # a single sequence: self-reconstruction only
    assert {v for k, v in seen["case_000"] if k == "s"} == {0, 2}
    # i = j and i != j both occur on complete cases (all ordered pairs, identity included)
    sampler2 = SynthesisSampler(store, ["case_002"], [32, 32], 2, 3, batch_size=16, seed=2)
    b = sampler2.next_batch()
    assert (b["source_idx"] == b["target_idx"]).any() and (b["source_idx"] != b["target_idx"]).any()


def test_shapes_padding_and_target_values(store):
    # patch larger than the image in-plane (32 -> 40): zero padded; mask is 0 in the padding
    s = SynthesisSampler(store, ["case_002"], [40, 40], 2, 3, batch_size=2, seed=0)
    b = s.next_batch()
    assert b["source"].shape == (2, 3, 40, 40) and b["target"].shape == (2, 3, 40, 40) and b["mask"].shape == (2, 3, 40, 40)
    assert float(b["mask"][:, :, :4].sum()) == 0 and float(b["source"][:, :, :4].abs().sum()) == 0
    # without augmentation the target is exactly the stored target slices
    info = store.cases["case_002"]
    smp = s.sample("case_002", 0, 3, (8, 16, 16))
    full = np.asarray(info.data[3])
    np.testing.assert_array_equal(smp["target"][:, 4:36, 4:36], full[7:10])
    # edge slice: adjacent slices are clamped to the volume
    smp = s.sample("case_002", 0, 0, (0, 16, 16))
    np.testing.assert_array_equal(smp["source"][0], smp["source"][1])
    s3 = SynthesisSampler(store, ["case_002"], [8, 24, 24], 3, 1, batch_size=2, seed=0)
    b3 = s3.next_batch()
    assert b3["source"].shape == (2, 1, 8, 24, 24) and b3["mask"].shape == (2, 1, 8, 24, 24)


def test_sampler_is_reproducible_and_checkpointable(store):
    a = SynthesisSampler(store, store.names, [32, 32], 2, 3, batch_size=2, seed=5)
    a.next_batch()
    state = a.state_dict()
    x1 = a.next_batch()
    a.load_state_dict(state)
    x2 = a.next_batch()
    assert torch.equal(x1["source"], x2["source"]) and x1["cases"] == x2["cases"]
    v1 = fixed_validation_batches(store, store.names, [32, 32], 2, 3, 2, 2, seed=3)
    v2 = fixed_validation_batches(store, store.names, [32, 32], 2, 3, 2, 2, seed=3)
    assert all(torch.equal(p["target"], q["target"]) for p, q in zip(v1, v2))
    assert all(float(m["mask"].mean()) > 0 for m in v1)  # brain-centred


def test_foreground_bias(store):
    s = SynthesisSampler(store, ["case_002"], [8, 8], 2, 3, batch_size=64, seed=0, oversample_foreground=1.0)
    b = s.next_batch()
    assert float(b["mask"][:, 1, 4, 4].mean()) == 1.0  # every centre voxel is brain


def off_draws_nothing_and_range_is_checked(cls, store, option: str, key: str) -> None:
    """A sampler option at 0 draws nothing extra (the same batches as a sampler built before the option existed),
    and a value outside [0, 1] is an error that names it."""
    from nnsynth.exceptions import NnsynthError
    a = cls(store, store.names, [8, 8], 2, 3, batch_size=4, seed=3)
    b = cls(store, store.names, [8, 8], 2, 3, batch_size=4, seed=3, **{option: 0.0})
    torch.testing.assert_close(a.next_batch()[key], b.next_batch()[key])
    with pytest.raises(NnsynthError, match=option):
        cls(store, store.names, [8, 8], 2, 3, batch_size=4, seed=3, **{option: 1.5})


def test_label_oversampling_centres_patches_on_lesions(tmp_path):
    from nnsynth.exceptions import PlansError
    from nnsynth.preprocessing.storage import load_case, save_case
    from test_training_engine import make_trainer
    pre = make_preprocessed(tmp_path, n_cases=2)
    folder = pre / "nnsynthPlans_2d"
    data, seg, props = load_case(folder, "case_001")
    z, y, x = (int(v) for v in np.median(np.argwhere(seg[0] >= 0), axis=0))
    seg[0, z, y - 1:y + 2, x - 1:x + 2] = 2                # a 9-voxel lesion inside the brain
    save_case(folder, "case_001", data, seg, props)
    store = CaseStore(folder, ["case_000", "case_001"])
    assert len(store.cases["case_000"].labelled) == 0 and len(store.cases["case_001"].labelled) == 9

    def on_lesion(sampler, case, n=400):
        hits = 0
        for _ in range(n):
            c = sampler._center(store.cases[case])
            hits += bool(seg[0][c] > 0)
        return hits / n

    half = SynthesisSampler(store, ["case_001"], [8, 8], 2, 3, batch_size=2, seed=0, oversample_labels=0.5)
    assert 0.4 < on_lesion(half, "case_001") < 0.6         # 9 of ~5000 brain voxels otherwise
    off = SynthesisSampler(store, ["case_001"], [8, 8], 2, 3, batch_size=2, seed=0)
    assert on_lesion(off, "case_001") < 0.05
    always = SynthesisSampler(store, ["case_000"], [8, 8], 2, 3, batch_size=2, seed=0, oversample_labels=1.0,
                              oversample_foreground=1.0)
    seg0 = np.asarray(store.cases["case_000"].seg)[0]
    assert all(seg0[always._center(store.cases["case_000"])] >= 0 for _ in range(20))   # no labels: brain centres
    off_draws_nothing_and_range_is_checked(SynthesisSampler, store, "oversample_labels", "source")
    plans = tiny_plans()
    plans["configurations"]["2d"]["training"]["oversample_labels"] = "often"
    with pytest.raises(PlansError, match="oversample_labels"):
        make_trainer(pre, tmp_path / "out", plans=plans).oversample_labels


def test_bias_field_multiplicative_smooth_positive_image_only():
    torch.manual_seed(0)
    img = torch.rand(3, 48, 48) + 0.5
    img[:, :4] = 0
    tgt = torch.rand(3, 48, 48)
    t = BiasFieldTransform(scale=0.3, order=3)
    out = t(image=img.clone(), regression_target=tgt.clone())
    assert torch.equal(out["regression_target"], tgt)            # target untouched
    field = out["image"][:, 4:] / img[:, 4:]
    assert float(field.min()) > 0                                  # positive
    assert torch.allclose(field[0], field[1]) and torch.allclose(field[0], field[2])  # one field for all channels
    assert float(out["image"][:, :4].abs().max()) == 0             # multiplicative: zero stays zero
    assert not torch.allclose(field, torch.ones_like(field))       # it did something
    second_diff = (field[0, 2:] - 2 * field[0, 1:-1] + field[0, :-2]).abs().max()
    assert float(second_diff) < 0.01                               # smooth (low-order)
    out3 = t(image=torch.ones(1, 8, 16, 16))                       # 3D too
    assert out3["image"].shape == (1, 8, 16, 16) and float(out3["image"].min()) > 0


def test_augmentation_spatial_on_both_intensity_on_image_only():
    torch.manual_seed(0)
    np.random.seed(0)
    img = torch.rand(3, 40, 40)
    aug = build_augmentation([32, 32], 2, {"p_rotation": 0, "p_scaling": 0, "mirror_axes": [], "p_gamma": 1.0,
                                           "p_brightness": 1.0, "p_noise": 1.0, "p_bias_field": 1.0})
    out = aug(image=img.clone(), regression_target=img.clone(), segmentation=torch.ones(3, 40, 40, dtype=torch.int16))
    assert out["image"].shape == (3, 32, 32)
    assert torch.equal(out["regression_target"], img[:, 4:36, 4:36])   # only cropped: intensity left it alone
    assert not torch.allclose(out["image"], out["regression_target"])
    aug = build_augmentation([32, 32], 2, {"p_rotation": 1.0, "p_scaling": 1.0, "mirror_axes": [1], "p_gamma": 0,
                                           "p_brightness": 0, "p_noise": 0, "p_bias_field": 0})
    out = aug(image=img.clone(), regression_target=img.clone(), segmentation=torch.ones(3, 40, 40, dtype=torch.int16))
    assert torch.allclose(out["image"], out["regression_target"])       # same spatial transform on both
    assert not torch.allclose(out["image"], img[:, 4:36, 4:36])


def test_source_brightness_follows_the_plans_range_and_only_synthesis_inputs_get_it():
    plans_aug = {"p_gamma": 0, "p_noise": 0, "p_bias_field": 0, "p_brightness": 1.0, "brightness": [0.5, 0.6]}
    aug = build_intensity_augmentation(plans_aug)
    img = torch.full((3, 8, 8), 0.5)
    factors = {round(float(aug(image=img.clone())["image"].mean()) / 0.5, 4) for _ in range(20)}
    assert all(0.5 <= f <= 0.6 for f in factors) and len(factors) > 1
    # CodeBrain and the segmentation trainers keep DEFAULT_AUGMENTATION's milder brightness
    kept = without_source_brightness(plans_aug)
    assert "p_brightness" not in kept and "brightness" not in kept and kept["p_gamma"] == 0
    assert without_source_brightness(None) == {}
    milder = build_intensity_augmentation({**kept, "p_brightness": 1.0})
    lo, hi = DEFAULT_AUGMENTATION["brightness"]
    assert all(lo <= float(milder(image=img.clone())["image"].mean()) / 0.5 <= hi for _ in range(20))


def test_read_box_pads_with_fill():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    box = read_box(arr, 1, [-1, 0, 3], [3, 2, 4], fill=-1)
    assert box.shape == (3, 2, 4)
    assert (box[0] == -1).all() and (box[:, :, 2:] == -1).all()
    np.testing.assert_array_equal(box[1:, :, :2], arr[1, 0:2, 0:2, 3:5])


_WORKER_SCRIPT = """
import sys
import blosc2
sys.path.insert(0, sys.argv[2])
from test_training_engine import tiny_case
from nnsynth.preprocessing.storage import save_case
from nnsynth.training.dataloading import CaseStore, SynthesisSampler, make_training_iterator
blosc2.set_nthreads(2)  # what a 2-core machine gets by default; GPU machines get more
data, seg, props = tiny_case(0, (12, 160, 160))  # chunks of several blosc2 blocks: the threaded path
save_case(sys.argv[1], "case_000", data, seg, props)
store = CaseStore(sys.argv[1], ["case_000"])
sampler = SynthesisSampler(store, ["case_000"], [8, 128, 128], 3, 1, batch_size=2, seed=0)
sampler.next_batch()  # the parent decompresses first, as the first validation batches do
batches = make_training_iterator(sampler, 2)
for _ in range(4):
    assert next(batches)["source"].shape[-3:] == (8, 128, 128)
batches._finish()
print("workers delivered")
"""


def test_background_workers_read_3d_patches_after_the_parent_did(tmp_path):
    """Forked workers must not wait on blosc2 decompression threads that only the parent had (a hang, not an error).

    Before CaseStore opened its arrays single-threaded, every worker of a 3d GPU run sat in a futex wait forever.
    """
    tests_dir = str(Path(__file__).parent)
    try:
        r = run_in_own_session([sys.executable, "-c", _WORKER_SCRIPT, str(tmp_path / "pre"), tests_dir], 120)
    except subprocess.TimeoutExpired:
        pytest.fail("background workers delivered no batch within 120 s (blosc2 threads after fork)")
    assert r.returncode == 0 and "workers delivered" in r.stdout, r.stdout + r.stderr


def test_lesion_paste_moves_a_labelled_lesion_with_every_sequence_into_other_cases(tmp_path):
    from nnsynth.exceptions import PlansError
    from nnsynth.preprocessing.storage import load_case, save_case
    from nnsynth.training.dataloading import MultiSequenceSampler
    from test_training_engine import make_trainer
    # case 1 is the only donor: a 3x5x5 lesion whose voxels hold one marked value per sequence; it lacks T1Gd, so
    # it can give its lesion to case 2 (T1 and T2 only) but not to case 0 (complete)
    pre = make_preprocessed(tmp_path, n_cases=3, availability={1: (True, False, True, True),
                                                               2: (True, False, True, False)})
    folder = pre / "nnsynthPlans_2d"
    data, seg, props = load_case(folder, "case_001")
    z, y, x = (int(v) for v in np.median(np.argwhere(seg[0] >= 0), axis=0))
    marks = np.array([0.11, 0.0, 0.33, 0.44], np.float32)
    seg[0, z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 2
    data[:, z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = marks[:, None, None, None]
    save_case(folder, "case_001", data, seg, {**props, "has_label": True})
    store = CaseStore(folder, ["case_000", "case_001", "case_002"])
    sampler = MultiSequenceSampler(store, store.names, [16, 16], 2, 3, batch_size=8, seed=0, lesion_paste=1.0)
    assert sampler.donors == {"case_000": [], "case_001": [], "case_002": ["case_001"]}
    seen, pasted = {"case_000": 0, "case_002": 0}, 0
    for _ in range(10):
        b = sampler.next_batch()
        for i, case in enumerate(b["cases"]):
            lesion = b["labels"][i] == 2
            assert b["available"][i].nonzero().flatten().tolist() == store.cases[case].available
            if case == "case_001":
                continue
            seen[case] += 1
            if case == "case_000":
                assert not bool(lesion.any())                  # no donor has all of its sequences
                continue
            pasted += bool(lesion.any())          # unless the patch sits at the brain's edge, where it is cut off
            for s in (0, 2):                                   # both of its sequences carry the donor's voxels
                torch.testing.assert_close(b["images"][i, s][lesion], torch.full((int(lesion.sum()),), float(marks[s])))
            assert float(b["images"][i, 3].abs().max()) == 0.0  # its missing Flair stays missing
    assert min(seen.values()) >= 10 and pasted >= 0.7 * seen["case_002"]
    off_draws_nothing_and_range_is_checked(MultiSequenceSampler, store, "lesion_paste", "images")
    plans = tiny_plans()
    plans["configurations"]["2d"].setdefault("augmentation", {})["p_lesion_paste"] = 0.4
    trainer = make_trainer(pre, tmp_path / "out", plans=plans)
    trainer.initialize()
    assert trainer.multi_sequence_sampler(1).lesion_paste == 0.4
    plans["configurations"]["2d"]["augmentation"]["p_lesion_paste"] = "often"
    with pytest.raises(PlansError, match="p_lesion_paste"):
        make_trainer(pre, tmp_path / "out2", plans=plans).lesion_paste
