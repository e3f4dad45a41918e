"""The benchmark protocol (bench/protocol): episode sampler, paired statistics, lr choice, isolation.

These rules decide which method "wins" in every table, so each test checks a way the rule
could silently break (and fails if it does).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import episodes as ep  # noqa: E402
from bench.protocol import isolation, lr_search, measure, stats  # noqa: E402

pytest.importorskip("scipy")


def _domain(name: str = "d", classes: int = 6, per_class: int = 30) -> ep.Domain:
    return ep.Domain(name, np.repeat(np.arange(classes), per_class))


# -- episodes ---------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(classes=st.integers(2, 8), per_class=st.integers(4, 25), seed=st.integers(0, 2**16), k=st.integers(0, 50),
       ways=st.tuples(st.integers(2, 4), st.integers(0, 4)), shots=st.tuples(st.integers(2, 4), st.integers(0, 8)))
def test_episode_is_a_valid_task(classes: int, per_class: int, seed: int, k: int, ways: tuple[int, int], shots: tuple[int, int]) -> None:
    config = ep.EpisodeConfig(ways=(ways[0], ways[0] + ways[1]), shots=(shots[0], shots[0] + shots[1]), query=7)
    domain = _domain(classes=classes, per_class=max(per_class, shots[0] + 1))
    e = ep.sample_episode(domain, config, seed=seed, domain_episode=k)
    support, query = set(e.support.tolist()), set(e.query.tolist())
    assert not support & query, "query overlaps support"
    assert not set(e.train.tolist()) & set(e.validation.tolist()), "validation shots also train"
    assert len(support) == len(e.support), "a sample drawn twice"
    assert config.ways[0] <= e.ways <= config.ways[1] or e.ways == classes
    assert e.ways <= classes and len(set(e.classes)) == e.ways
    assert config.shots[0] <= e.shots <= config.shots[1]
    for label, cls in enumerate(e.classes):  # episode label k is domain class classes[k], in every split
        for indices, labels in ((e.train, e.train_labels), (e.validation, e.validation_labels), (e.query, e.query_labels)):
            assert (domain.labels[indices[labels == label]] == cls).all()
        assert (e.train_labels == label).sum() >= 1 and (e.validation_labels == label).sum() >= 1
        assert (e.train_labels == label).sum() + (e.validation_labels == label).sum() == e.shots
    counts = np.bincount(e.query_labels, minlength=e.ways)
    assert (counts == counts[0]).all() and counts[0] >= 1, "query not balanced"


def test_episodes_are_seeded_and_extend() -> None:
    domains = [_domain("a"), _domain("b", classes=4)]
    first = ep.sample_episodes(domains, 3, seed=5)
    again = ep.sample_episodes(domains, 3, seed=5)
    longer = ep.sample_episodes(domains, 5, seed=5)
    assert [e.to_dict() for e in first] == [e.to_dict() for e in again]
    assert [e.to_dict() for e in first] == [e.to_dict() for e in longer[:6]], "a longer run must extend a shorter one"
    other = ep.sample_episodes(domains, 3, seed=6)
    assert [e.to_dict() for e in first] != [e.to_dict() for e in other]
    assert [e.domain for e in first] == ["a", "b"] * 3, "domains must be interleaved"


def test_episodes_differ_in_task() -> None:
    """The old workload drew the same 10 classes every time: tasks must vary."""
    episodes = ep.sample_episodes([_domain(classes=10)], 30, ep.EpisodeConfig(ways=(2, 5), shots=(2, 8)), seed=0)
    assert len({e.classes for e in episodes}) >= 25
    assert len({e.ways for e in episodes}) >= 3
    assert len({e.shots for e in episodes}) >= 4


def test_episode_round_trips_through_json() -> None:
    e = ep.sample_episodes([_domain()], 1)[0]
    back = ep.Episode.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back.to_dict() == e.to_dict()
    assert np.array_equal(back.support, e.support)


def test_novel_class_split_is_respected() -> None:
    domain = ep.Domain("digits", np.repeat(np.arange(10), 20), classes=(5, 6, 7, 8, 9))
    for e in ep.sample_episodes([domain], 20):
        assert set(e.classes) <= {5, 6, 7, 8, 9}


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="ways"):
        ep.EpisodeConfig(ways=(1, 3))
    with pytest.raises(ValueError, match="validation"):
        ep.EpisodeConfig(shots=(1, 5), validation=0.25)
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        ep.sample_episode(ep.Domain("tiny", np.array([0, 0, 0, 1])), ep.EpisodeConfig(), seed=0)


# -- statistics -----------------------------------------------------------------------------

def test_paired_t_matches_scipy() -> None:
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    a = rng.normal(0.6, 0.1, 25)
    b = a - rng.normal(0.02, 0.03, 25)
    d = stats.paired_t(a, b, names=("new", "old"))
    reference = sps.ttest_rel(a, b)
    interval = reference.confidence_interval(0.95)
    assert d.mean == pytest.approx(float(np.mean(a - b)))
    assert (d.low, d.high) == pytest.approx((interval.low, interval.high))
    assert d.p_value == pytest.approx(reference.pvalue)


def test_no_winner_when_interval_includes_zero() -> None:
    a = [0.50, 0.70, 0.40, 0.65, 0.55]
    b = [0.52, 0.66, 0.43, 0.62, 0.56]  # mean difference +0.002, spread far larger
    for d in (stats.paired_t(a, b, names=("x", "y")), stats.paired_bootstrap(a, b, names=("x", "y"))):
        assert d.low < 0 < d.high
        assert stats.winner(d) is None
        assert "no difference shown" in stats.verdict(d)


def test_winner_named_only_with_a_clear_interval() -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(0.3, 0.9, 40)
    a = b + 0.05 + rng.normal(0, 0.01, 40)
    for d in (stats.paired_t(a, b, names=("x", "y")), stats.paired_bootstrap(a, b, names=("x", "y"))):
        assert stats.winner(d) == "x"
        assert stats.verdict(d).startswith("x better")
    flipped = stats.paired_t(b, a, names=("y", "x"))
    assert stats.winner(flipped) == "x"


def test_too_few_pairs_conclude_nothing() -> None:
    for d in (stats.paired_t([0.9], [0.1]), stats.paired_bootstrap([0.9], [0.1])):
        assert math.isinf(d.low) and math.isinf(d.high) and stats.winner(d) is None


def test_unpaired_or_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_t([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_bootstrap([0.1, float("nan")], [0.1, 0.2])


def test_bootstrap_interval_covers_the_true_mean() -> None:
    """About 95% of intervals from repeated experiments contain the true difference (0.03)."""
    rng = np.random.default_rng(2)
    hits = 0
    trials = 200
    for trial in range(trials):
        b = rng.uniform(0.2, 0.8, 30)
        a = b + rng.normal(0.03, 0.05, 30)
        d = stats.paired_bootstrap(a, b, resamples=2000, seed=trial)
        hits += d.low <= 0.03 <= d.high
    assert 0.88 <= hits / trials <= 0.99


def test_grouped_bootstrap_refuses_groups_of_one() -> None:
    """One episode per domain has no spread to resample: a grouped interval would collapse to a point."""
    with pytest.raises(ValueError, match="at least 2 pairs per group"):
        stats.paired_bootstrap([0.9, 0.5, 0.7], [0.8, 0.4, 0.7], groups=["a", "b", "c"])


def test_grouped_bootstrap_keeps_group_shares() -> None:
    """Resampling within domains: a domain with a huge effect keeps its weight, so the interval
    is narrower than resampling episodes freely (which also reweights domains)."""
    diff = np.r_[np.full(10, 0.2), np.zeros(10)] + np.random.default_rng(3).normal(0, 0.01, 20)
    free = stats.paired_bootstrap(diff, np.zeros(20), resamples=4000)
    grouped = stats.paired_bootstrap(diff, np.zeros(20), resamples=4000, groups=["a"] * 10 + ["b"] * 10)
    assert grouped.mean == pytest.approx(free.mean)
    assert (grouped.high - grouped.low) < 0.5 * (free.high - free.low)


# -- learning-rate choice --------------------------------------------------------------------

def test_lr_is_chosen_on_validation_never_query() -> None:
    candidates = [
        lr_search.Candidate(1e-4, validation_accuracy=0.60, validation_loss=1.0, query_accuracy=0.95),
        lr_search.Candidate(1e-3, validation_accuracy=0.80, validation_loss=0.9, query_accuracy=0.50),
        lr_search.Candidate(1e-2, validation_accuracy=0.80, validation_loss=0.7, query_accuracy=0.40),
    ]
    choice = lr_search.choose_lr(candidates)
    assert choice.lr == 1e-2, "tie on validation accuracy goes to the lower validation loss, whatever the query says"
    assert len(choice.to_dict()["candidates"]) == 3


def test_lr_choice_skips_diverged_runs() -> None:
    choice = lr_search.choose_lr([lr_search.Candidate(1.0, math.nan, math.nan), lr_search.Candidate(1e-3, 0.2, 3.0)])
    assert choice.lr == 1e-3


def test_search_lr_trains_every_candidate() -> None:
    seen = []

    def train(lr: float) -> lr_search.Candidate:
        seen.append(lr)
        return lr_search.Candidate(lr, validation_accuracy=-abs(math.log10(lr) + 3), validation_loss=0.0)

    assert lr_search.search_lr(lr_search.log_grid(1e-3, points=5, factor=10 ** 0.5), train).lr == 1e-3
    assert len(seen) == 5
    with pytest.raises(ValueError):
        lr_search.search_lr([0.0], train)


# -- isolation and memory ---------------------------------------------------------------------

def test_interleaving_runs_every_row_per_episode_in_varying_order() -> None:
    schedule = isolation.interleaved(list(range(6)), ["a", "b", "c", "d"], seed=0)
    assert [e for e, _ in schedule] == [e for e in range(6) for _ in range(4)]
    orders = {tuple(r for e, r in schedule if e == k) for k in range(6)}
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders) and len(orders) > 1


def child_target(job: dict, context: object) -> dict:
    """Used by the test below, in a fresh process: a transient peak while loading (freed), then
    an allocation after the ready point, which is all that training added."""
    loading = np.ones(128 * 2**20 // 8)
    loading[::512] += 1
    del loading
    context.probe.ready()
    block = np.ones(job["megabytes"] * 2**20 // 8)
    block[::512] += 1  # touch every page
    memory = context.probe.finish()
    return {"memory": memory, "sum": float(block[:10].sum()), "omp": __import__("os").environ.get("OMP_NUM_THREADS")}


def test_fresh_process_measures_what_training_adds(tmp_path: Path) -> None:
    done = isolation.run_fresh("tests.test_bench_protocol:child_target", {"megabytes": 64}, work=tmp_path, tag="t", threads=1)
    memory = done.result["memory"]
    assert done.result["omp"] == "1" and done.result["threads"]["requested"] == 1
    assert memory["peak_reset"], "this kernel refused to reset VmHWM: the fallback is only a lower bound"
    assert 60 * 2**20 <= memory["rss_added_bytes"] <= 90 * 2**20, memory  # not hidden by the 128 MiB loading peak
    assert memory["peak_rss_bytes"] >= 128 * 2**20
    assert done.cpu_seconds > 0


def test_child_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(isolation.ChildFailed, match="exited 1"):
        isolation.run_fresh("tests.test_bench_protocol:no_such_function", {}, work=tmp_path, tag="bad")


def test_probe_needs_the_ready_point() -> None:
    with pytest.raises(RuntimeError, match="ready"):
        measure.MemoryProbe().finish()
