"""Temperature scaling and split-conformal prediction sets: the math, and the fit after each
experience (medcl.metrics.conformal, medcl.engine.posthoc)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny import tiny_raw

from medcl.config import CalibrationConfig, RunConfig, validate_config
from medcl.engine.components import build_components
from medcl.engine.device import use_layout
from medcl.engine.posthoc import fit_posthoc, read_posthoc
from medcl.engine.run import run
from medcl.errors import ConfigError, DataError
from medcl.metrics.calibration import expected_calibration_error
from medcl.metrics.conformal import (
    ConformalSets,
    apply_temperature,
    aps_scores,
    conformal_quantile,
    fit_conformal,
    fit_temperature,
)
from medcl.metrics.coverage import coverage_table


def _draw(
    rng: np.random.Generator, n: int, *, k: int = 4, spread: float = 2.0, sharpen: float = 2.0
):
    """Labels drawn from softmax(z), reported probabilities softmax(sharpen * z): a model whose
    confidence is too high by a known temperature ``sharpen``."""
    z = rng.normal(size=(n, k)) * spread
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = (true.cumsum(1) < rng.random((n, 1))).sum(1)
    reported = np.exp(sharpen * z) / np.exp(sharpen * z).sum(1, keepdims=True)
    return labels, reported


def test_temperature_recovers_known_overconfidence_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    y, p = _draw(rng, 4000, sharpen=2.0)
    t = fit_temperature(y, p)
    assert 1.8 < t < 2.2  # the reported scores are the true ones times 2
    calibrated = apply_temperature(p, t)
    assert (calibrated.argmax(1) == p.argmax(1)).all()
    np.testing.assert_allclose(calibrated.sum(1), 1.0, atol=1e-12)
    yt, pt = _draw(rng, 4000, sharpen=2.0)
    before, _ = expected_calibration_error(yt, pt)
    after, _ = expected_calibration_error(yt, apply_temperature(pt, t))
    assert after < before / 2
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)
    with pytest.raises(ConfigError, match="temperature must be"):
        apply_temperature(p, 0.0)


def test_scores_and_the_conformal_quantile():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(aps_scores([1, 0], p), [0.8, 1.0])
    assert conformal_quantile(np.arange(1, 20) / 20, 0.1) == pytest.approx(
        18 / 20
    )  # ceil(20*.9)=18
    assert conformal_quantile([0.5] * 8, 0.1) == np.inf  # n + 1 < 1 / alpha: no finite threshold
    with pytest.raises(ConfigError, match="alpha must lie in"):
        conformal_quantile([0.5], 1.5)
    with pytest.raises(ConfigError, match="score must be one of"):
        fit_conformal([0, 1], np.eye(2), score="raps", mondrian="none")


def _fixed(q: float, k: int = 4, score: str = "lac") -> ConformalSets:
    return ConformalSets(0.1, "none", score, 100, {"*": (np.full(k, q), np.full(k, 100))})


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_hold_the_top_class_and_grow_with_the_threshold(score):
    rng = np.random.default_rng(1)
    _, p = _draw(rng, 300)
    small = _fixed(0.3, score=score).sets(p)
    large = _fixed(0.95, score=score).sets(p)
    assert small[np.arange(300), p.argmax(1)].all() and large[np.arange(300), p.argmax(1)].all()
    assert (large >= small).all() and large.sum() > small.sum()
    assert _fixed(np.inf, score=score).sets(p).all()


def test_lac_sets_say_which_two_class_inputs_are_uncertain():
    """Two classes: LAC gives both classes to the inputs whose probabilities are close, one to
    the confident ones; deterministic APS gives every input the same set size."""
    rng = np.random.default_rng(5)
    y, p = _draw(rng, 2000, k=2, sharpen=1.0)
    _, pt = _draw(rng, 2000, k=2, sharpen=1.0)
    lac = fit_conformal(y, p, alpha=0.1, mondrian="none", score="lac").sets(pt)
    size = lac.sum(1)
    assert 0.1 < (size == 2).mean() < 0.9
    assert np.abs(pt[size == 2, 0] - 0.5).mean() < np.abs(pt[size == 1, 0] - 0.5).mean()
    aps = fit_conformal(y, p, alpha=0.1, mondrian="none", score="aps").sets(pt)
    assert len(np.unique(aps.sum(1))) == 1


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("mondrian", ["none", "site", "class", "site_class"])
def test_coverage_holds_on_an_exchangeable_stream(mondrian, score):
    """Split conformal: average coverage over fresh calibration/test draws is >= 1 - alpha and
    (the top class aside) close to it."""
    rng = np.random.default_rng(2)
    alpha, covered, sizes = 0.1, [], []
    for _ in range(40):
        yc, pc = _draw(rng, 600)
        yt, pt = _draw(rng, 600)
        sites = ["a"] * 300 + ["b"] * 300
        fitted = fit_conformal(yc, pc, alpha=alpha, mondrian=mondrian, score=score, sites=sites)
        table = coverage_table(fitted.sets(pt, sites), yt, sites).set_index("group")
        covered.append(table.loc["overall", "coverage"])
        sizes.append(table.loc["overall", "mean_size"])
    assert 1 - alpha <= np.mean(covered) <= 1 - alpha + 0.05
    assert 1 < np.mean(sizes) < 4  # informative: neither one class nor every class


def test_per_site_thresholds_cover_a_shifted_site_where_one_threshold_does_not():
    """Site b's labels are noisier than its probabilities say: a pooled threshold under-covers
    it; Mondrian (per-site) thresholds cover both sites."""
    rng = np.random.default_rng(3)
    alpha = 0.1

    def cohort(n):
        ya, pa = _draw(rng, n, sharpen=1.0)
        yb, pb = _draw(rng, n, spread=0.7, sharpen=3.0)
        return np.r_[ya, yb], np.r_[pa, pb], ["a"] * n + ["b"] * n

    yc, pc, sc = cohort(1500)
    yt, pt, st = cohort(1500)
    pooled = coverage_table(fit_conformal(yc, pc, alpha=alpha, mondrian="none").sets(pt), yt, st)
    mondrian = fit_conformal(yc, pc, alpha=alpha, mondrian="site", sites=sc)
    per_site = coverage_table(mondrian.sets(pt, st), yt, st).set_index("group")
    assert pooled.set_index("group").loc["b", "coverage"] < 1 - alpha - 0.03
    assert (per_site.loc[["a", "b"], "coverage"] >= 1 - alpha - 0.02).all()
    # site unknown: the largest site threshold covers every site at least as well as its own
    unknown = coverage_table(mondrian.sets(pt), yt, st).set_index("group")
    assert (unknown.loc[["a", "b"], "coverage"] >= per_site.loc[["a", "b"], "coverage"]).all()
    with pytest.raises(DataError, match="known sites"):
        mondrian.sets(pt[:1], ["c"])


def test_class_thresholds_keep_coverage_under_a_prevalence_shift():
    """Class 0 is easy, class 1 hard; calibrated where class 0 is common, tested where it is
    rare: one threshold under-covers; per-class thresholds keep coverage."""
    rng = np.random.default_rng(6)

    def cohort(n, share0):
        y = (rng.random(n) >= share0).astype(int)
        p_true = np.where(y == 0, rng.beta(8, 2, n), rng.beta(2, 2, n))
        p1 = np.where(y == 1, p_true, 1 - p_true)
        return y, np.c_[1 - p1, p1]

    yc, pc = cohort(3000, 0.9)
    yt, pt = cohort(3000, 0.1)
    sites = ["s"] * len(yt)
    one = coverage_table(fit_conformal(yc, pc, mondrian="none").sets(pt), yt, sites)
    per_class = fit_conformal(yc, pc, mondrian="class").sets(pt)
    assert one.loc[0, "coverage"] < 0.85
    assert coverage_table(per_class, yt, sites).loc[0, "coverage"] >= 0.88


def test_a_class_absent_from_a_site_enters_its_sets_only_as_top_class():
    """Class-incremental sites (a: classes 0-1, b: 2-3): with (site, class) thresholds a site's
    sets hold only its own classes (plus the top class), and they survive the record."""
    rng = np.random.default_rng(7)
    y, p = _draw(rng, 2000)
    sites = np.where(y < 2, "a", "b")
    fitted = fit_conformal(y, p, alpha=0.1, mondrian="site_class", sites=sites)
    again = ConformalSets.from_dict(json.loads(json.dumps(fitted.to_dict())))
    for sets in (fitted.sets(p, sites), again.sets(p, sites)):
        top = p.argmax(1)
        foreign = np.where((sites == "a")[:, None], [[0, 0, 1, 1]], [[1, 1, 0, 0]]).astype(bool)
        extra = sets & foreign
        extra[np.arange(len(y)), top] = False
        assert not extra.any()
        own = coverage_table(sets, y, sites).set_index("group")
        assert (own.loc[["a", "b"], "coverage"] >= 0.88).all()


def test_record_round_trips_and_coverage_intervals_bracket_the_estimate():
    rng = np.random.default_rng(4)
    y, p = _draw(rng, 500)
    sites = ["s"] * 250 + ["t"] * 250
    sets = fit_conformal(y, p, alpha=0.2, mondrian="site_class", sites=sites)
    again = ConformalSets.from_dict(json.loads(json.dumps(sets.to_dict())))
    np.testing.assert_array_equal(again.sets(p, sites), sets.sets(p, sites))
    assert again.sites == ["s", "t"] and sets.thresholds("s").shape == (4,)
    table = coverage_table(sets.sets(p, sites), y, sites)
    low, cov, high = table["coverage_low"], table["coverage"], table["coverage_high"]
    assert ((low <= cov) & (cov <= high)).all()
    assert (table["size_low"] <= table["mean_size"]).all() and (table["empty"] == 0).all()
    with pytest.raises(DataError, match="cover 4 classes"):
        sets.sets(p[:, :3])


def _tiny_cfg(tmp_path, **calibration) -> RunConfig:
    raw = tiny_raw(output_dir=str(tmp_path), calibration=calibration)
    raw["scenario"].update({"n_train": 96})
    raw["train"].update({"epochs": 6})
    return RunConfig.model_validate(raw)


def test_fit_after_each_experience_uses_validation_only(tmp_path):
    """The record after each experience is written by the run; replacing every test split by
    noise changes nothing in it (the test split is never used)."""
    cfg = _tiny_cfg(tmp_path, alpha=0.2)
    run_dir = run(cfg, quiet=True)
    records = [read_posthoc(run_dir, k) for k in (0, 1)]
    assert all(r is not None and r.temperature > 0 for r in records)
    assert records[1].sites == [
        e["name"] for e in json.loads((run_dir / "scenario.json").read_text())["experiences"]
    ]
    scenario, strategy, memory = build_components(cfg)
    from medcl.engine.resume import restore_checkpoint

    restore_checkpoint(run_dir, strategy, memory, experience=1)
    noisy = [
        dataclasses.replace(
            e, test=dataclasses.replace(e.test, images=torch.randint_like(e.test.images, 0, 255))
        )
        for e in scenario.experiences
    ]
    use_layout(strategy, cfg.train.channels_last, 2)  # the run calibrates in its layout
    refit = fit_posthoc(strategy, noisy, cfg.calibration, seed=cfg.seed)
    assert refit["temperature"] == pytest.approx(records[1].temperature, rel=1e-6)
    assert refit["conformal"] == records[1].record["conformal"]
    # ... and it is the temperature of the first validation halves, recomputed here
    from medcl.engine.evaluate import predict_proba
    from medcl.engine.posthoc import _split

    probs, labels = [], []
    for e in scenario.experiences:
        half, _ = _split(len(e.val), cfg.seed * 1000 + e.index)
        probs.append(predict_proba(strategy, e.val.images)[half])
        labels.append(e.val.labels[half])
    expected = fit_temperature(torch.cat(labels).numpy(), torch.cat(probs).double().numpy())
    assert records[1].temperature == pytest.approx(expected, rel=1e-6)
    assert 0.03 < expected < 45  # an interior optimum of the search on [0.02, 50]


def test_switches_and_unreadable_record(tmp_path):
    cfg = _tiny_cfg(tmp_path, temperature=False, conformal=False)
    run_dir = run(cfg, quiet=True)
    record = read_posthoc(run_dir, 1)
    assert record.temperature == 1.0 and record.conformal is None
    with pytest.raises(DataError, match="no conformal calibration"):
        record.sets(np.full((1, 4), 0.25))
    (run_dir / "calibration" / "after-001.json").write_text("{not json")
    with pytest.raises(DataError, match=r"after-001\.json is not a readable calibration record"):
        read_posthoc(run_dir, 1)
    assert read_posthoc(run_dir, 7) is None  # no record: a run from before calibration


def test_per_experience_switch_writes_one_temperature_per_class(tmp_path):
    """``per_experience``: the record has one temperature per class (here every group falls
    back to the common one: a tiny validation split has fewer than 20 rows per group); off: no
    per-class list."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = run(_tiny_cfg(tmp_path / "on", per_experience=True), quiet=True)
    off = run(_tiny_cfg(tmp_path / "off", per_experience=False), quiet=True)
    record = read_posthoc(on, 1)
    assert len(record.record["temperatures"]) == 4
    assert record.temperatures == [record.temperature] * 4
    assert read_posthoc(off, 1).record["temperatures"] is None
    assert read_posthoc(off, 1).temperatures == [read_posthoc(off, 1).temperature]
    assert CalibrationConfig().alpha == 0.1


def _two_heads(rng: np.random.Generator, sharpen: tuple[float, float]):
    """Rows predicted in classes 0-1 (head 0) and 2-3 (head 1), each head over-confident by its
    own factor."""
    y0, p0 = _draw(rng, 300, sharpen=sharpen[0])
    y1, p1 = _draw(rng, 300, sharpen=sharpen[1])
    top0, top1 = p0.argmax(1) < 2, p1.argmax(1) >= 2
    return np.r_[y0[top0], y1[top1]], np.r_[p0[top0], p1[top1]]


def test_auto_keeps_per_experience_temperatures_only_where_cross_validation_prefers_them():
    """``per_experience: auto`` (the default): heads miscalibrated differently -> one
    temperature each, every draw; heads miscalibrated alike -> the extra temperatures only add
    variance, and one temperature wins on most draws."""
    from types import SimpleNamespace

    from medcl.engine.posthoc import _choose_per_experience

    assert CalibrationConfig().per_experience == "auto"
    seen = [SimpleNamespace(classes=(0, 1)), SimpleNamespace(classes=(2, 3))]
    differ, alike = [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        y, p = _two_heads(rng, (2.0, 0.5))
        differ.append(_choose_per_experience(y, p, seen, seed))
        y, p = _two_heads(rng, (2.0, 2.0))
        alike.append(_choose_per_experience(y, p, seen, seed))
    assert all(c["chosen"] == "per_experience" for c in differ)
    assert all(c["cv_nll"]["per_experience"] < c["cv_nll"]["one"] - 0.02 for c in differ)
    assert sum(c["chosen"] == "one" for c in alike) >= 8


def test_per_experience_accepts_true_false_auto_and_refuses_anything_else(tmp_path):
    cfg = _tiny_cfg(tmp_path, per_experience="Auto")
    assert cfg.calibration.per_experience == "auto"
    assert _tiny_cfg(tmp_path, per_experience="false").calibration.per_experience is False
    with pytest.raises(ConfigError, match=r"must be true, false or 'auto'.*\(got 'always'\)"):
        validate_config(
            tiny_raw(output_dir=str(tmp_path), calibration={"per_experience": "always"})
        )


@pytest.mark.parametrize("chosen", ["one", "per_experience"])
def test_auto_choice_is_recorded_and_applied(tmp_path, monkeypatch, chosen):
    """The run records the cross-validated choice and keeps per-class temperatures only when
    it chose them (the choice itself is stubbed: the tiny split is too small to decide)."""
    import medcl.engine.posthoc as posthoc

    def stub(y, probs, seen, seed, folds=5):
        return {"cv_nll": {"one": 1.0, "per_experience": 0.9}, "chosen": chosen, "seed": seed}

    monkeypatch.setattr(posthoc, "_choose_per_experience", stub)
    run_dir = run(_tiny_cfg(tmp_path), quiet=True)  # per_experience: auto, the default
    record = read_posthoc(run_dir, 1).record
    assert record["temperature_choice"] == stub(None, None, None, 1)  # seed 0 * 1000 + after 1
    kept = record["temperatures"]
    assert (kept is not None) == (chosen == "per_experience")
    assert kept is None or len(kept) == 4


def test_per_experience_temperatures_follow_the_top_class():
    """Rows predicted in experience 0's classes are over-confident by 2, experience 1's
    under-confident by 2: one temperature each recovers both; each row takes its top class's,
    in numpy and inside the exported module."""
    from types import SimpleNamespace

    from medcl.engine.posthoc import _per_experience
    from medcl.export.module import ExportModule
    from medcl.models.deployable import DeployableModel

    rng = np.random.default_rng(8)
    y0, p0 = _draw(rng, 3000, sharpen=2.0)
    y1, p1 = _draw(rng, 3000, sharpen=0.5)
    top0, top1 = p0.argmax(1) < 2, p1.argmax(1) >= 2
    y, p = np.r_[y0[top0], y1[top1]], np.r_[p0[top0], p1[top1]]
    seen = [SimpleNamespace(classes=(0, 1)), SimpleNamespace(classes=(2, 3))]
    t = _per_experience(y, p, seen, fit_temperature(y, p))
    assert t[0] == t[1] and t[2] == t[3]
    assert 1.7 < t[0] < 2.4 and 0.4 < t[2] < 0.6
    assert _per_experience(y, p, [SimpleNamespace(classes=(0, 1, 2, 3))], 1.5) is None
    calibrated = apply_temperature(p, t)
    assert (calibrated.argmax(1) == p.argmax(1)).all()
    one = np.r_[apply_temperature(p[: top0.sum()], t[0]), apply_temperature(p[top0.sum() :], t[2])]
    np.testing.assert_allclose(calibrated, one, atol=1e-12)

    class Scores(DeployableModel):  # the first 4 inputs are the class scores
        def forward_features(self, x):
            return x.flatten(1)[:, :4]

        def forward_head(self, features, pre_logits=False):
            return features

    module = ExportModule(Scores()).eval()
    module.temperature = torch.tensor(t, dtype=torch.float32)
    scores = torch.randn(64, 4) * 3
    x = (scores * 0.5 + 0.5).reshape(64, 4, 1, 1)  # ExportModule normalises (x - 0.5) / 0.5
    probs, _, _ = module(x)
    want = apply_temperature(torch.softmax(scores, 1).double().numpy(), t)
    np.testing.assert_allclose(probs.double().numpy(), want, atol=1e-5)
