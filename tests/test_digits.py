"""Digits data split, the committed digits teacher and classifier, and the Frechet distance.

Thresholds on the committed weights are stated next to each test with the measured value (from
``src/carv/assets/digits_teacher_stats.json``) and the margin; statistical ones are given in
standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carv.teachers import digits_metrics as dm
from carv.teachers.digits import (
    digits_split_indices,
    load_digits_data,
    load_digits_teacher,
    sample_digits,
)
from carv.teachers.evaluation import GaussianLinearTeacher, heldout_denoising_mse


# ---------------------------------------------------------------------------------------------- data
def test_split_is_deterministic_disjoint_stratified_and_pinned():
    tr, te, al = (digits_split_indices(s) for s in ("train", "test", "all"))
    assert torch.equal(tr, digits_split_indices("train")) and torch.equal(te, digits_split_indices("test"))
    assert tr.dtype == te.dtype == torch.int64
    assert (tr.diff() > 0).all() and (te.diff() > 0).all()
    assert len(set(tr.tolist()) & set(te.tolist())) == 0
    assert torch.equal(torch.sort(torch.cat([tr, te])).values, al)
    assert (len(tr), len(te), len(al)) == (1442, 355, 1797)
    # pinned: a change of the split rule would silently change every attribution index
    assert int(te.sum()) == 322086 and te[:5].tolist() == [33, 36, 37, 40, 44]
    _, y_all = load_digits_data("all", size=8)
    _, y_te = load_digits_data("test", size=8)
    n_all = torch.bincount(y_all, minlength=10)
    n_te = torch.bincount(y_te, minlength=10)
    assert torch.equal(n_te, n_all // 5)  # stratified: every class is split 80/20 (rounded down)


def test_data_rows_match_sklearn_and_indices():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x8, y8 = load_digits_data("train", size=8)
    idx = digits_split_indices("train").numpy()
    np.testing.assert_allclose(x8[:, 0].numpy(), raw.images[idx] / 8.0 - 1.0, atol=1e-6)
    assert np.array_equal(y8.numpy(), raw.target[idx])
    x16, y16 = load_digits_data("test")
    assert x16.shape == (355, 1, 16, 16) and x16.dtype == torch.float32 and y16.dtype == torch.int64
    assert x16.min() >= -1 and x16.max() <= 1
    x16[0] = 5.0  # returned tensors are copies
    assert load_digits_data("test")[0].max() <= 1


@pytest.mark.parametrize("bad", ["val", "TRAIN", None, 0])
def test_bad_split_names_argument_value_and_choices(bad):
    with pytest.raises(ValueError, match=r"split: expected one of 'train', 'test', 'all', got"):
        load_digits_data(bad)
    with pytest.raises(ValueError, match="split"):
        digits_split_indices(bad)


@pytest.mark.parametrize("bad", [4, 7.5, True, "16"])
def test_bad_size(bad):
    with pytest.raises(ValueError, match=r"size: expected an integer >= 8 .*got"):
        load_digits_data("train", size=bad)


# ---------------------------------------------------------------------------------------------- teacher
@pytest.fixture(scope="module")
def teacher():
    return load_digits_teacher()


@pytest.fixture(scope="module")
def test_data():
    return load_digits_data("test")


def test_teacher_loads_small_and_frozen(teacher):
    n = sum(p.numel() for p in teacher.parameters())
    assert 100_000 < n < 600_000
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.model.cond_classes == (10,) and teacher.schedule.num_timesteps == 1000
    assert torch.allclose(teacher.schedule.alphas_cumprod[[0, -1]],
                          torch.tensor([1 - 1e-4, 4.04e-5], dtype=torch.float64), rtol=1e-2)


def test_teacher_heldout_denoising_mse(teacher, test_data):
    # Protocol: all 355 test images x 5 fixed midpoint timesteps (t = 100, 300, ..., 900), noise
    # seed 0, conditional. Measured: teacher 0.0184 (SE 0.0006); best linear (Gaussian) denoiser
    # 0.0327 (SE 0.0010), i.e. ~12 combined SE worse; eps_hat = 0: 1.0.
    # Threshold 0.025 = measured + ~11 SE, and still ~7 SE below the linear baseline.
    x, y = test_data
    mse, se = heldout_denoising_mse(teacher, x, y, timesteps_per_image=5, seed=0)
    lin, lin_se = heldout_denoising_mse(GaussianLinearTeacher(load_digits_data("train")[0], teacher.schedule),
                                        x, y, timesteps_per_image=5, seed=0)
    assert 1.0 - mse > 100 * se  # eps_hat = 0 is > 100 standard errors worse
    assert lin - mse > 8 * (se**2 + lin_se**2) ** 0.5  # beats the best linear denoiser by > 8 SE
    assert mse < MSE_THRESHOLD


MSE_THRESHOLD = 0.025  # see test_teacher_heldout_denoising_mse


def test_teacher_samples_are_classified_correctly(teacher):
    # 3 samples per class, DDIM 10 steps, guidance 2, seed 0. Measured 30 of 30 (also for seeds 1, 2,
    # and at 5 DDIM steps; 1000 of 1000 at 50 steps); floor 0.9 (27 of 30).
    labels = torch.arange(10).repeat_interleave(3)
    x = sample_digits(teacher, labels, guidance_scale=2.0, steps=10, seed=0)
    assert x.shape == (30, 1, 16, 16) and torch.isfinite(x).all()
    assert dm.classifier_accuracy(x, labels) >= 0.9


def test_teacher_eps_is_finite_across_timesteps(teacher):
    # predict_eps on noised test images at every tenth timestep is finite
    x, y = load_digits_data("test")
    t = torch.arange(0, 1000, 100)
    out = teacher.predict_eps(teacher.schedule.add_noise(x[:10], t, torch.zeros_like(x[:10])), t, y[:10])
    assert out.shape == (10, 1, 16, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- classifier
def test_classifier_heldout_accuracy(test_data):
    # measured 0.9915 (352 of 355 held-out images); floor 0.97 (one SE of a 0.97 accuracy is 0.009)
    x, y = test_data
    clf = dm.load_digits_classifier()
    assert clf is dm.load_digits_classifier()  # cached
    assert dm.classifier_accuracy(x, y) >= 0.97
    f = dm.features(x[:7])
    assert f.shape == (7, 64) and torch.isfinite(f).all()
    assert torch.equal(dm.predict(x[:7]), clf(x[:7]).argmax(1))
    n = sum(p.numel() for p in clf.parameters())
    assert n < 200_000


@pytest.mark.parametrize("shape", [(4, 16, 16), (4, 3, 16, 16), (4, 1, 8, 8), (4, 1, 32, 32)])
def test_bad_image_shape_names_argument(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"images: expected shape \[N, 1, 16, 16\].*got \("):
        dm.features(x)
    with pytest.raises(ValueError, match="images"):
        dm.digits_fd(x)
    with pytest.raises(ValueError, match="images"):
        dm.classifier_accuracy(x, torch.zeros(4, dtype=torch.long))


def test_bad_labels_and_reference():
    x = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match=r"labels: expected shape \[4\]"):
        dm.classifier_accuracy(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reference: expected one of 'test', 'train', 'all', got 'val'"):
        dm.digits_fd(x, reference="val")
    with pytest.raises(TypeError, match="images"):
        dm.features(np.zeros((4, 1, 16, 16), np.float32))


# ---------------------------------------------------------------------------------------------- Frechet
def _w2_2x2(mu1, s1, mu2, s2):
    # closed form for 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); M = s1^1/2 s2 s1^1/2
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_frechet_from_stats_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal: |dmu|^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = dm.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # non-commuting 2x2 covariances
    for _ in range(5):
        l1, l2 = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = l1 @ l1.T + 0.1 * np.eye(2), l2 @ l2.T + 0.1 * np.eye(2)
        m1, m2 = rng.normal(size=2), rng.normal(size=2)
        assert dm.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(_w2_2x2(m1, s1, m2, s2), rel=1e-8)
    # brute force in 6-d: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))
    l1, l2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)))
    want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert dm.frechet_distance_from_stats(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(want, rel=1e-8)


def test_frechet_samples_self_symmetry_and_singular():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(dm.frechet_distance(x, x)) < 1e-6
    y = torch.randn(400, 8, generator=g) + 0.5
    assert dm.frechet_distance(x, y) == pytest.approx(dm.frechet_distance(y, x), rel=1e-6)
    # rank-deficient covariances (fewer samples than dimensions): finite, non-negative
    a, b = torch.randn(10, 64, generator=g), torch.randn(12, 64, generator=g)
    fd = dm.frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0


def test_frechet_samples_converge_to_closed_form():
    # N(0, I) vs N(mu, diag(4)) in d=4: W2^2 = |mu|^2 + d (2 - 1)^2 = 4 * 0.25 + 4 = 5.
    # The plug-in estimate has O(d/n) bias and sd ~ 0.05 at n = 20000 (checked by repeats); tol 0.2.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 4, generator=g, dtype=torch.float64) + 0.5
    assert dm.frechet_distance(a, b) == pytest.approx(5.0, abs=0.2)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match=r"feats: expected shape \[N, D\] with N >= 2"):
        dm.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="feats_b: expected feature dimension 3"):
        dm.frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="eps: expected a non-negative"):
        dm.frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), eps=-1.0)


def test_digits_fd_real_images_small_and_samples_far_from_noise():
    x_te, _ = load_digits_data("test")
    x_tr, _ = load_digits_data("train")
    fd_real = dm.digits_fd(x_tr[:355])
    noise = torch.rand(355, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = dm.digits_fd(noise)
    assert dm.digits_fd(x_te) == pytest.approx(0.0, abs=1e-6)
    assert fd_real < 0.1 * fd_noise
