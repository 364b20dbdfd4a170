"""Image I/O: exact round trips in every supported format, atomic writes, geometry tolerance."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnsynth.dataset.io import Geometry, read_header, read_image, write_image
from nnsynth.exceptions import ImageReadError

ENDINGS = [".nii.gz", ".nii", ".mha", ".nrrd"]


@pytest.fixture
def folder(tmp_path):
    """An empty folder of our own (tmp_path also holds the shared conftest's nnsynth_data)."""
    d = tmp_path / "io"
    d.mkdir()
    return d


def _rotation(ndim: int) -> tuple:
    """An oblique, orthonormal direction matrix (row-major, SimpleITK order)."""
    a, b = math.radians(20), math.radians(-35)
    if ndim == 2:
        return (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


def _geometry(ndim: int) -> Geometry:
    if ndim == 3:
        return Geometry(spacing=(0.7, 1.3, 2.5), origin=(-91.5, 120.25, -7.0), direction=_rotation(3),
                        shape=(5, 7, 9))
    return Geometry(spacing=(0.45, 1.7), origin=(12.5, -3.75), direction=_rotation(2), shape=(7, 9))


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_round_trip(folder, ending, ndim):
    geom = _geometry(ndim)
    arr = np.random.default_rng(ndim).normal(size=geom.shape).astype(np.float32)
    path = folder / f"img{ending}"
    write_image(arr, geom, path)
    back, g2 = read_image(path)
    assert back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert g2.shape == geom.shape
    # NIfTI stores geometry in float32: identical up to float32 precision
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(g2, name), getattr(geom, name), rtol=0, atol=1e-5)
    assert geom.mismatch(g2) == ""
    assert read_header(path) == g2
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temp files left


def test_integer_dtype_round_trip(folder):
    geom = _geometry(3)
    lab = np.random.default_rng(0).integers(0, 4, size=geom.shape).astype(np.uint8)
    write_image(lab, geom, folder / "seg.nii.gz", dtype=np.uint8)
    back, _ = read_image(folder / "seg.nii.gz", dtype=None)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab)


def test_failing_write_keeps_old_file(folder, monkeypatch):
    geom = _geometry(3)
    path = folder / "img.nii.gz"
    old = np.ones(geom.shape, np.float32)
    write_image(old, geom, path)
    before = path.read_bytes()

    def broken_write(image, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half-written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    from nnsynth.exceptions import OutputWriteError
    with pytest.raises(OutputWriteError, match="disk full"):     # a clear user error, not an ITK traceback
        write_image(np.zeros(geom.shape, np.float32), geom, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["img.nii.gz"]


def test_write_shape_mismatch_writes_nothing(folder):
    with pytest.raises(ValueError):
        write_image(np.zeros((2, 3, 4), np.float32), _geometry(3), folder / "x.nii.gz")
    assert list(folder.iterdir()) == []


def test_unreadable_and_unsupported(folder):
    bad = folder / "bad.nii.gz"
    bad.write_bytes(os.urandom(100))
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_header(bad)
    with pytest.raises(ImageReadError, match="unsupported file ending"):
        write_image(np.zeros((2, 2), np.float32), Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (2, 2)),
                    folder / "x.png")
    rgb = sitk.Compose([sitk.GetImageFromArray(np.ones((3, 4), np.float32))] * 3)
    sitk.WriteImage(rgb, str(folder / "rgb.mha"))
    with pytest.raises(ImageReadError, match="components"):
        read_image(folder / "rgb.mha")


def test_geometry_mismatch_tolerance():
    g = Geometry((1.0, 1.0, 2.0), (100.0, -50.0, 10.0), tuple(np.eye(3).ravel()), (4, 5, 6))
    same = Geometry((1.0 + 5e-5, 1.0, 2.0), (100.0 + 5e-3, -50.0, 10.0), g.direction, g.shape)
    assert g.mismatch(same) == ""  # within 1e-4 relative to the largest magnitude
    assert "spacing" in g.mismatch(Geometry((1.001, 1.0, 2.0), g.origin, g.direction, g.shape))
    assert "origin" in g.mismatch(Geometry(g.spacing, (100.0, -50.0, 10.5), g.direction, g.shape))
    assert "direction" in g.mismatch(Geometry(g.spacing, g.origin, _rotation(3), g.shape))
    assert "shape" in g.mismatch(Geometry(g.spacing, g.origin, g.direction, (4, 5, 7)))
    g2 = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (5, 6))
    assert g.mismatch(g2) != "" and g2.mismatch(g) != ""
    assert Geometry.from_dict(g.to_dict()) == g


def test_read_image_refuses_truncated_nifti(tmp_path):
    """ITK fills a truncated .nii.gz with zeros; read_image must refuse it instead."""
    import gzip

    import numpy as np
    import pytest as _pytest

    from nnsynth.dataset.io import Geometry, read_image, write_image
    from nnsynth.exceptions import ImageReadError

    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32) + 1
    geo = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), arr.shape)
    path = tmp_path / "img.nii.gz"
    write_image(arr, geo, path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with _pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_read_image_refuses_nan_nifti(tmp_path):
    import numpy as np
    import pytest as _pytest

    from nnsynth.dataset.io import Geometry, read_image, write_image
    from nnsynth.exceptions import ImageReadError

    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    geo = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), arr.shape)
    write_image(arr, geo, tmp_path / "nan.nii.gz")
    with _pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.nii.gz")
