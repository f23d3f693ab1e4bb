"""The LDS benchmark: the metric (against dattri's), its standard error, TRAK scores, the ground truth's
configuration, and the dattri diffusion task (draws as data) with dattri's own attributors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from carv.bench.attribution_lds import LdsBenchConfig, crossed_se, lds, lds_config_from_flags, trak_scores
from carv.bench.lds_truth import (
    MODEL_FILE,
    TRUTH,
    TRUTH_FILE,
    load_truth,
    pool_indices,
    query_draws,
    query_indices,
    subset_masks,
    truth_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the metric
def test_lds_matches_dattri_metric():
    metrics = pytest.importorskip("dattri.metric")
    g = torch.Generator().manual_seed(0)
    n, N, Q = 40, 30, 7
    scores = torch.randn(Q, n, generator=g, dtype=torch.float64)
    masks = subset_masks(N, n, 0.5, seed=3)
    # outputs that depend on the subsets, so the correlations are far from 0 and of both signs
    outputs = -(masks.double() @ scores.T) * torch.tensor([1, -1, 1, 0.5, 2, -0.3, 1.0]) \
        + torch.randn(N, Q, generator=g, dtype=torch.float64)
    ours = lds(scores, masks, outputs)
    indices = torch.stack([m.nonzero().flatten() for m in masks])
    theirs, _ = metrics.lds(scores.T, (-outputs, indices))
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-10, atol=1e-12)
    assert ours.max() > 0.5 and ours.min() < -0.3


def test_lds_hand_checked_case():
    # two pool examples; subsets {0}, {1}, {0, 1}: summed scores (a, b, a + b) with a = 1, b = 2 -> ranks 0, 1, 2
    masks = torch.tensor([[True, False], [False, True], [True, True]])
    scores = torch.tensor([[1.0, 2.0]])
    assert lds(scores, masks, torch.tensor([[3.0], [2.0], [1.0]])).item() == pytest.approx(1.0)   # loss falls
    assert lds(scores, masks, torch.tensor([[1.0], [2.0], [3.0]])).item() == pytest.approx(-1.0)
    # ranks (0, 1, 2) against (1, 0, 2): Spearman = 1 - 6 * 2 / (3 * 8) = 0.5
    assert lds(scores, masks, -torch.tensor([[2.0], [1.0], [3.0]])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("bad, match", [
    (dict(scores=torch.zeros(3)), "scores"),
    (dict(masks=torch.zeros(4, 5)), "masks"),            # not bool
    (dict(masks=torch.zeros(4, 6, dtype=torch.bool)), "masks"),
    (dict(outputs=torch.zeros(4, 3)), "outputs"),
    (dict(masks=torch.zeros(2, 5, dtype=torch.bool), outputs=torch.zeros(2, 2)), "at least 3"),
])
def test_lds_bad_input(bad, match):
    args = dict(scores=torch.zeros(2, 5), masks=torch.zeros(4, 5, dtype=torch.bool), outputs=torch.zeros(4, 2))
    with pytest.raises(ValueError, match=match):
        lds(**{**args, **bad})


def test_crossed_se_matches_the_spread_of_the_grand_mean():
    # values = replicate effect + query effect + noise; the estimated s.e. must match the empirical s.d. of the
    # grand mean over independent experiments (400 of them: the s.d. estimate has a relative s.e. of about 3.5%)
    g = torch.Generator().manual_seed(1)
    R, Q, sr, sq, se = 3, 40, 0.3, 0.5, 0.4
    means, ses = [], []
    for _ in range(400):
        v = (sr * torch.randn(R, 1, generator=g) + sq * torch.randn(1, Q, generator=g)
             + se * torch.randn(R, Q, generator=g))
        means.append(float(v.mean()))
        ses.append(crossed_se(v))
    true_sd = math.sqrt(sr**2 / R + sq**2 / Q + se**2 / (R * Q))
    emp_sd = torch.tensor(means).std().item()
    rms_se = torch.tensor(ses).pow(2).mean().sqrt().item()
    assert abs(emp_sd / true_sd - 1) < 4 * 0.035  # 4 sigma
    assert abs(rms_se / true_sd - 1) < 0.15        # the estimator is unbiased for the variance (R = 3: noisy)
    with pytest.raises(ValueError, match="values"):
        crossed_se(torch.zeros(2, 1))


def test_trak_scores_are_the_regularised_least_squares_solution():
    g = torch.Generator().manual_seed(2)
    phi, q = torch.randn(30, 8, generator=g), torch.randn(3, 8, generator=g)
    s = trak_scores(q, phi, damping=1e-3)
    gram = phi.double().T @ phi.double()
    lam = 1e-3 * gram.trace() / 8
    expected = q.double() @ torch.linalg.inv(gram + lam * torch.eye(8, dtype=torch.float64)) @ phi.double().T
    torch.testing.assert_close(s, expected)
    with pytest.raises(ValueError, match="query, train"):
        trak_scores(q[:, :3], phi)


def test_lds_config_validation(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        LdsBenchConfig(methods=["carv", "nope"]).validate()
    with pytest.raises(ValueError, match="budgets"):
        LdsBenchConfig(budgets=[]).validate()
    with pytest.raises(ValueError, match="damping"):
        LdsBenchConfig(damping=0.0).validate()
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"replicate": 3}))
    with pytest.raises(ValueError, match="unknown field"):
        lds_config_from_flags(bad)
    assert lds_config_from_flags(quick=True, seed=1).budgets == [1, 4]


# ---------------------------------------------------------------------------------------------- ground truth
def test_subset_masks_are_halves_and_extend():
    m = subset_masks(10, 50, 0.5, seed=1)
    assert m.shape == (10, 50) and (m.sum(1) == 25).all()
    assert torch.equal(subset_masks(4, 50, 0.5, seed=1), m[:4])       # more subsets leave the first ones alone
    assert not torch.equal(m[0], m[1])
    for kw, match in ((dict(n_subsets=0), "n_subsets"), (dict(ratio=1.0), "ratio"), (dict(ratio=0.001), "ratio")):
        with pytest.raises(ValueError, match=match):
            subset_masks(**{**dict(n_subsets=2, pool_size=50, ratio=0.5, seed=0), **kw})


def test_train_digits_teacher_rejects_bad_indices_and_architecture():
    from carv.teachers.digits import train_digits_teacher

    with pytest.raises(ValueError, match="indices"):
        train_digits_teacher(indices=torch.tensor([0, 5000]), steps=1, progress=False)
    with pytest.raises(ValueError, match="indices"):
        train_digits_teacher(indices=torch.tensor([0.0, 1.0]), steps=1, progress=False)
    with pytest.raises(ValueError, match="architecture"):
        train_digits_teacher(architecture={"width": 3}, steps=1, progress=False)


def _committed_truth():
    path = ROOT / TRUTH_FILE
    if not path.is_file():
        pytest.skip("no committed LDS ground truth")
    return load_truth(path)


def test_committed_ground_truth_matches_its_reproduce_command_config():
    tensors, cfg = _committed_truth()
    from carv._runfolder import load_tensors

    meta = load_tensors(ROOT / TRUTH_FILE, "LDS ground truth")[1]
    n = cfg["n_subsets"]
    assert n >= 64 and cfg == json.loads(json.dumps({**TRUTH, "n_subsets": n}))
    assert meta["fingerprint"] == truth_fingerprint(TRUTH)
    assert "benchmarks/attribution_lds_truth.py train" in meta["command"]
    assert torch.equal(tensors["masks"], subset_masks(n, TRUTH["pool_size"], TRUTH["subset_ratio"],
                                                      TRUTH["mask_seed"]))
    assert torch.equal(tensors["pool"], pool_indices(TRUTH)) and torch.equal(tensors["queries"], query_indices(TRUTH))
    assert tensors["outputs"].shape == (n, TRUTH["n_queries"]) and torch.isfinite(tensors["outputs"]).all()
    # the committed whole-pool model is the one the ground truth was made with: its outputs on the fixed draws
    from carv.bench.lds_truth import model_outputs
    from carv.teachers.unet import load_unet_teacher

    teacher = load_unet_teacher(ROOT / MODEL_FILE)
    assert teacher.meta["lds_truth"] == truth_fingerprint(TRUTH) and teacher.meta["model"] == "full"
    torch.testing.assert_close(model_outputs(teacher, *query_draws(TRUTH)), tensors["full_outputs"])


def test_committed_lds_json_has_the_issue_schema():
    path = ROOT / "docs" / "attribution_lds.json"
    if not path.is_file():
        pytest.skip("no committed LDS benchmark result")
    d = json.loads(path.read_text())
    tensors, cfg = _committed_truth()
    assert d["n_subsets"] == cfg["n_subsets"] and d["subset_ratio"] == cfg["subset_ratio"]
    methods = {r["method"] for r in d["rows"]}
    assert {"carv", "iid"} <= methods
    for r in d["rows"]:
        assert {"method", "evaluations", "lds", "lds_se"} <= set(r) and -1 <= r["lds"] <= 1 and r["lds_se"] >= 0


# ---------------------------------------------------------------------------------------------- dattri task
@pytest.fixture(scope="module")
def digits_features():
    from carv.objectives.attribution import GradientFeatures
    from carv.teachers.digits import load_digits_data, load_digits_teacher
    from carv.timesteps import TimestepSampler

    teacher = load_digits_teacher()
    feats = GradientFeatures(teacher, TimestepSampler(1000, stratify="per_upstream"), K=2, noise="crn",
                             proj_dim=None)
    x, y = load_digits_data("train")
    return feats, x[:4], y[:4]


def test_dattri_task_gradients_use_the_draws_given_as_data(digits_features):
    pytest.importorskip("dattri")
    from carv.integrations.dattri import diffusion_task, draws_dataset

    feats, x, y = digits_features
    task = diffusion_task(feats)
    data = draws_dataset(feats, x, y, generator=0).tensors
    assert (data[2] == data[2][:1]).all() and (data[3] == data[3][:1]).all()  # CRN: every example shares the draws
    params, _ = task.get_param()
    theirs = task.get_grad_loss_func(in_dims=(None, 0))(params, data)  # vmap(grad, randomness="different")
    torch.testing.assert_close(theirs, feats.gradients(data), rtol=1e-5, atol=1e-7)
    # the same call twice gives the same gradients: nothing is drawn inside the loss
    torch.testing.assert_close(task.get_grad_loss_func(in_dims=(None, 0))(params, data), theirs)


def test_dattri_tracin_attributor_finds_the_query_itself(digits_features):
    pytest.importorskip("dattri")
    from dattri.algorithm.tracin import TracInAttributor

    from carv.integrations.dattri import diffusion_task, draws_loader

    feats, x, y = digits_features
    task = diffusion_task(feats)
    att = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=True,
                           projector_kwargs={"proj_dim": 16, "device": "cpu"})
    train = draws_loader(feats, x, y, generator=0, batch_size=4)
    # queries: training images 1 and 3 with the same (shared) draws; grad-cos must rank each first
    test = draws_loader(feats, x[[1, 3]], y[[1, 3]], generator=0, batch_size=4)
    scores = att.attribute(train, test)
    assert scores.shape == (4, 2)
    assert scores.argmax(0).tolist() == [1, 3]


def test_dattri_task_bad_input(digits_features):
    pytest.importorskip("dattri")
    from carv.integrations.dattri import diffusion_task, draws_loader
    from carv.objectives.attribution import GradientFeatures
    from carv.teachers.digits import load_digits_teacher
    from carv.timesteps import TimestepSampler

    feats, x, y = digits_features
    with pytest.raises(TypeError, match="features"):
        diffusion_task("not features")
    partial = GradientFeatures(load_digits_teacher(), TimestepSampler(1000), params=["conv_out"], proj_dim=None)
    with pytest.raises(ValueError, match="params='all'"):
        diffusion_task(partial)
    with pytest.raises(TypeError, match="checkpoints"):
        diffusion_task(feats, checkpoints=[1])
    with pytest.raises(ValueError, match="batch_size"):
        draws_loader(feats, x, y, batch_size=0)



def test_dattri_trak_attributor_with_shared_draws(digits_features):
    pytest.importorskip("dattri")
    from dattri.algorithm.trak import TRAKAttributor

    from carv.integrations.dattri import diffusion_task, draws_loader, unit_probability

    feats, x, y = digits_features
    att = TRAKAttributor(task=diffusion_task(feats), correct_probability_func=unit_probability,
                         projector_kwargs={"proj_dim": 16, "device": "cpu"}, device="cpu", regularization=1e-6)
    att.cache(draws_loader(feats, x, y, generator=0, batch_size=4))
    scores = att.attribute(draws_loader(feats, x[[1, 3]], y[[1, 3]], generator=0, batch_size=4))
    assert scores.shape == (4, 2) and torch.isfinite(scores).all()
    assert scores.argmax(0).tolist() == [1, 3]


def test_cli_lds_flag_refuses_a_bad_config(tmp_path):
    from typer.testing import CliRunner

    from carv.cli import app

    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"methods": ["carv", "bogus"]}))
    res = CliRunner().invoke(app, ["bench", "attribution", "--lds", "--config", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "methods" in res.output
