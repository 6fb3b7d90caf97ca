"""The digit preprocessing's fast order statistics and moments are numpy's and scipy's, to the bit.

``_percentiles``, ``_median``, ``_mean``, ``_std`` and ``_center_of_mass`` replace ``np.percentile``,
``np.median``, ``ndarray.mean``, ``ndarray.std`` and ``ndimage.center_of_mass`` on the request path
(they spent ~10-60 us each on set-up for a 28x28 digit).
The model was trained on the library functions' output, so anything short of identical would be a
silent shift: checked on random arrays, and end to end against the library functions on MNIST.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from app.tasks.digits import preprocess
from tests.support import SHARED_DATA


def arrays(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for trial in range(count):
        n = int(rng.integers(1, 2000))
        dtype = np.float32 if trial % 2 else np.float64
        if trial % 4 < 2:
            yield rng.random(n).astype(dtype)
        else:  # the 256 levels of an 8-bit image: many ties
            yield (rng.integers(0, 256, n) / 255.0).astype(dtype)


@pytest.mark.parametrize("qs", [(0.5, 99.5), (90.0,), (50.0,), (0.0, 100.0), (25.0, 75.0, 33.3)])
def test_percentiles_are_numpys(qs):
    for values in arrays(1, 1500):
        expected = np.percentile(values, qs)
        got = preprocess._percentiles(values, qs)
        assert [type(g) for g in got] == [type(e) for e in expected]
        assert got == list(expected)


def test_median_is_numpys():
    for values in arrays(2, 3000):
        assert preprocess._median(values) == float(np.median(values))


def test_mean_and_std_are_numpys():
    """1-D and 2-D, float32 and float64, sizes on both sides of numpy's pairwise-summation blocks."""
    rng = np.random.default_rng(5)
    for values in arrays(6, 3000):
        assert preprocess._mean(values) == float(values.mean())
        assert preprocess._std(values) == float(values.std())
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        image = (rng.random((h, w)) * (rng.random((h, w)) > 0.3)).astype(np.float32)
        assert preprocess._mean(image) == float(image.mean())
        assert preprocess._std(image) == float(image.std())


def _background_std_reference(frame: np.ndarray, ordered: np.ndarray) -> float:
    """The border's paper spread with numpy's percentile and std, and no shortcut for a 0 border."""
    paper = frame[frame <= np.percentile(frame, 90.0)]
    return float(paper.std()) if paper.size else 0.0


def test_background_std_is_numpys():
    """The border's spread below its 90th percentile, as numpy's std: on clean (all 0) borders,
    faint ones and noisy ones."""
    rng = np.random.default_rng(9)
    for trial, values in enumerate(arrays(10, 2000)):
        frame = values.astype(np.float32)
        if trial % 4 == 0:
            frame[:] = 0.0
        elif trial % 4 == 1:
            frame *= 1e-3 * (rng.random(frame.size) > 0.5)
        ordered = np.sort(frame)
        assert preprocess._background_std(frame, ordered) == _background_std_reference(frame, ordered)


def test_center_of_mass_is_scipys():
    rng = np.random.default_rng(3)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        patch = rng.random((h, w)).astype(np.float32) * (rng.random((h, w)) > 0.5)
        if patch.sum() == 0:
            continue
        assert preprocess._center_of_mass(patch) == tuple(float(c) for c in ndimage.center_of_mass(patch))


def test_normalised_digits_and_features_are_the_library_functions(monkeypatch):
    """MNIST test digits, inverted and noisy copies: the same arrays and features as with numpy's
    percentile and median and scipy's centre of mass."""
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        digits = data["x_test"][:600].astype(np.float32) / 255.0
    rng = np.random.default_rng(4)
    inputs = [*digits[:200], *(1.0 - digits[200:400]),
              *np.clip(digits[400:] + rng.normal(0, 0.2, digits[400:].shape), 0, 1).astype(np.float32)]

    def run() -> list:
        out = []
        for gray in inputs:
            try:
                digit = preprocess.normalize_gray(gray)
            except preprocess.BlankImageError:
                out.append(None)
                continue
            out.append((digit.array, preprocess.summary_features(digit), digit.background))
        return out

    fast = run()
    monkeypatch.setattr(preprocess, "_percentiles", lambda values, qs: list(np.percentile(values, qs)))
    monkeypatch.setattr(preprocess, "_median", lambda values: float(np.median(values)))
    # What the order statistics of the already-sorted border frame stand for, too.
    monkeypatch.setattr(preprocess, "_percentiles_of_sorted", lambda values, qs: list(np.percentile(values, qs)))
    monkeypatch.setattr(preprocess, "_median_of_sorted", lambda values: float(np.median(values)))
    monkeypatch.setattr(preprocess, "_center_of_mass", ndimage.center_of_mass)
    monkeypatch.setattr(preprocess, "_mean", lambda values: float(values.mean()))
    monkeypatch.setattr(preprocess, "_std", lambda values: float(values.std()))
    monkeypatch.setattr(preprocess, "_background_std", _background_std_reference)
    reference = run()
    assert sum(r is None for r in reference) < 10
    for got, expected in zip(fast, reference, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            assert np.array_equal(got[0], expected[0])
            assert got[1] == expected[1] and got[2] == expected[2]


def _ink_box_reference(ink: np.ndarray) -> tuple[slice, slice, float]:
    """The ink box as first written: label, drop the specks by area, the box of what is left."""
    mask = ink > preprocess.INK_THRESHOLD
    labels, n = ndimage.label(mask)
    if n > 1:
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, np.flatnonzero(areas >= preprocess.MIN_COMPONENT_FRACTION * areas.max()) + 1)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise preprocess.BlankImageError("no ink found")
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), np.count_nonzero(
        ink > preprocess.INK_THRESHOLD) / ink.size


def test_ink_box_is_the_box_of_the_strokes_without_specks():
    """One stroke, a few (some of them specks) and the thousands of specks of a noisy photo: the
    box the one-call paths give is the reference's."""
    rng = np.random.default_rng(8)
    seen = set()
    for trial in range(1500):
        h, w = (int(v) for v in rng.integers(3, 120, 2))
        ink = np.zeros((h, w), dtype=np.float32)
        for _ in range(int(rng.integers(0, 6))):  # strokes of random sizes: the small ones are specks
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            ink[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, 4))] = rng.random()
        if trial % 3 == 0:  # salt noise: from a few specks to hundreds of them
            ink[rng.random((h, w)) < rng.choice([0.002, 0.05, 0.3])] = 1.0
        n = ndimage.label(ink > preprocess.INK_THRESHOLD)[1]
        seen.add(0 if n == 0 else 1 if n == 1 else 2 if n <= preprocess._FEW_COMPONENTS else 3)
        try:
            expected = _ink_box_reference(ink)
        except preprocess.BlankImageError:
            with pytest.raises(preprocess.BlankImageError):
                preprocess._ink_box(ink)
            continue
        assert preprocess._ink_box(ink) == expected
    assert seen == {0, 1, 2, 3}  # no ink, one component, a few, more than _FEW_COMPONENTS
