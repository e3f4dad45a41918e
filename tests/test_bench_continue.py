"""Continuing a draw (bench/run.py --from-episode / --only-domains): the episodes a run adds are exactly the ones
the whole draw would have had next, with the same ids, tasks and row order, and none an earlier run already ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.protocol import episodes as ep  # noqa: E402
from bench.protocol.isolation import interleaved  # noqa: E402

S4 = ROOT / "bench" / "results" / "text-fewshot-s4.json"


def _domains() -> list[ep.Domain]:
    return [ep.Domain("trec", np.repeat(np.arange(6), 40)), ep.Domain("bbc", np.repeat(np.arange(5), 30))]


def test_continued_episodes_are_the_whole_draws_episodes_with_their_ids() -> None:
    config = ep.EpisodeConfig(ways=(2, 4), shots=(3, 6), query=5)
    whole = ep.sample_episodes(_domains(), 8, config, seed=0)
    earlier = ep.sample_episodes(_domains(), 3, config, seed=0)  # the run being continued
    later = ep.continue_episodes(whole, start=3, domains=["bbc"])
    assert [e.domain_episode for e in later] == [3, 4, 5, 6, 7]
    assert {e.domain for e in later} == {"bbc"}
    by_id = {e.index: e for e in whole}
    for e in later:
        assert e.to_dict() == by_id[e.index].to_dict(), "a continued episode must be drawn exactly as in the whole draw"
    assert not {e.index for e in later} & {e.index for e in earlier}, "no episode of the earlier run may run again"
    assert [e.to_dict() for e in earlier] == [e.to_dict() for e in whole[: len(earlier)]]
    rows = ["last_layer", "full", "lora"]
    full_order = {(e.index, r) for e, r in interleaved(whole, rows)}
    assert [(e.index, r) for e, r in interleaved(later, rows)] == [(e.index, r) for e, r in interleaved(whole, rows) if e in later]
    assert {(e.index, r) for e, r in interleaved(later, rows)} <= full_order
    assert ep.continue_episodes(whole) == whole
    with pytest.raises(ValueError, match="sms"):
        ep.continue_episodes(whole, domains=["sms"])


def test_text_fewshot_s4s_episodes_are_redrawn_as_they_ran() -> None:
    """The BBC and TREC episodes text-fewshot-s4 ran are those the seed-0 draw gives now (the s5 run continues it
    at episode 16 of bbc): same domain, ways, shots and classes for every id."""
    from bench.text import data

    try:
        corpora = {name: data.load(name) for name in ("trec", "bbc")}
    except SystemExit as error:  # the corpora are bench extras; the bench's loader exits naming the package to install
        pytest.skip(f"text corpora not installed: {error}")
    run = json.loads(S4.read_text())
    c = run["meta"]["episode_config"]
    config = ep.EpisodeConfig(ways=tuple(c["ways"]), shots=tuple(c["shots"]), query=c["query"], validation=c["validation"])
    domains = [ep.Domain(n, corpora[n].labels, class_names=dict(enumerate(corpora[n].class_names))) for n in run["meta"]["corpora"]]
    whole = ep.sample_episodes(domains, 32, config, seed=run["meta"]["settings"]["seed"])
    by_id = {e.index: e for e in whole}
    ran = {r["episode"]: r for r in run["records"] if r["row"] == "head_only"}
    assert len(ran) == 32
    for index, r in ran.items():
        e = by_id[index]
        assert (e.domain, e.ways, e.shots, list(e.class_names)) == (r["domain"], r["ways"], r["shots"], r["classes"]), index
    later = ep.continue_episodes(whole, start=16, domains=["bbc"])
    assert [e.domain_episode for e in later] == list(range(16, 32))
    assert not {e.index for e in later} & set(ran)
