"""The benchmark's rows, driver and report (bench/protocol): recipe rows are valid, the report names no
winner across zero, and a whole run on a tiny model keeps the protocol's promises (same head for every
row, lr chosen on validation shots, memory at the ready point, edgeplug = onnxruntime by hand)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders import cnn  # noqa: E402

from bench.protocol import report, rows  # noqa: E402
from bench.protocol.driver import Family, Settings, run_family  # noqa: E402
from bench.protocol.episodes import Domain, Episode, EpisodeConfig, sample_episodes  # noqa: E402

pytest.importorskip("scipy")
SETTINGS = {"batch_size": 8, "budget": 2**20, "classes": 3, "episode": 5}


def test_every_recipe_row_is_a_valid_recipe() -> None:
    from edgeplug.recipe import recipe_from_dict

    recipe_rows = rows.load_recipe_rows()
    assert {"full", "last_layer", "biases", "sparse_tinytrain", "sparse_static", "sparse_random", "last_k"} <= {r.name for r in recipe_rows}
    for row in recipe_rows:
        recipe = rows.resolve(dict(row.recipe), SETTINGS)
        recipe["passes"] = [{"name": "new-head", "options": {"classes": 3}}, *recipe.get("passes", [])]
        recipe_from_dict(recipe, source=row.name)  # raises on a bad recipe
        for other in row.compare:
            assert other in {r.name for r in recipe_rows} | {r.name for r in rows.BUILT_IN}, f"{row.name} compares to unknown {other}"


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("bench: {workloads: [fewshot]}\nloss: cross-entropy\npasses: []\n")
    with pytest.raises(SystemExit, match="unknown bench keys"):
        rows.load_recipe_rows(tmp_path)
    with pytest.raises(SystemExit, match=r"\$nope"):
        rows.resolve({"a": ["$nope"]}, SETTINGS)
    with pytest.raises(SystemExit, match="no row"):
        rows.select_rows("images", ["no_such_row"])


def _result(a: list[float], b: list[float]) -> dict:
    records = [{"row": name, "episode": k, "domain": "d" if k % 2 else "e", "ways": 2, "accuracy": acc, "lr": 0.01}
               for name, accs in (("new", a), ("last_layer", b)) for k, acc in enumerate(accs)]
    meta = {"title": "t", "settings": {"steps": 1, "batch_size": 1, "grid": [0.01], "threads": 1}, "machine": "m",
            "rows": [{"name": "last_layer", "label": "ll", "kind": "recipe", "order": 0, "compare": []},
                     {"name": "new", "label": "new", "kind": "recipe", "order": 1, "compare": ["last_layer"]}]}
    return {"meta": meta, "records": records}


def test_report_names_a_winner_only_outside_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.4, 0.8, 20))
    noisy = [v + d for v, d in zip(base, rng.normal(0, 0.1, 20), strict=True)]
    text = report.markdown(_result(noisy, base))
    assert "**new**" not in text and "no difference shown" in text
    clear = [v + 0.1 for v in base]
    assert "**new**" in report.markdown(_result(clear, base))
    pytest.importorskip("matplotlib")
    report.plot(_result(clear, base), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _npz_writer(x: np.ndarray) -> Callable[[Episode, Path], dict[str, Path]]:
    """An episode writer of a family over the examples `x`: one .npz (x, y) per split."""
    def write(episode: Episode, folder: Path) -> dict[str, Path]:
        out = {}
        for split, idx, lab in (("train", episode.train, episode.train_labels), ("validation", episode.validation, episode.validation_labels),
                                ("query", episode.query, episode.query_labels)):
            out[split] = folder / f"{split}.npz"
            np.savez(out[split], x=x[idx], y=lab)
        return out

    return write


def _family(tmp_path: Path) -> Family:
    model = cnn(channels=(4,), classes=10, image=8, batch_norm=False, seed=1)
    path = tmp_path / "cnn.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 14)
    centres = rng.normal(0, 1, (4, 1, 8, 8)).astype(np.float32)
    images = (centres[labels] + 0.8 * rng.normal(0, 1, (len(labels), 1, 8, 8))).astype(np.float32)
    domain = Domain("blobs", labels)
    episodes = sample_episodes([domain], 2, EpisodeConfig(ways=(2, 3), shots=(4, 6), query=4), seed=0)

    return Family("tiny", "tiny", path, episodes, _npz_writer(images), Settings(steps=3, batch_size=4, grid=(1e-3, 3e-2), threads=1))


@pytest.mark.slow
def test_a_run_keeps_the_protocol(tmp_path: Path) -> None:
    chosen = rows.select_rows("images", ["head_only", "full", "full_manual_ort", "last_layer", "biases"], torch=False)
    result = run_family(_family(tmp_path), chosen, tmp_path / "work", echo=lambda text: None, query_all=True)
    records = result["records"]
    assert not [r for r in records if "error" in r], [r["error"] for r in records if "error" in r]
    assert {(r["row"], r["episode"]) for r in records} == {(n, e) for n in ("head_only", "full", "full_manual_ort", "last_layer", "biases") for e in (0, 1)}
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["row"] == "head_only":
            continue
        choice = r["lr_choice"]
        assert [c["lr"] for c in choice["candidates"]] == [1e-3, 3e-2] and r["lr"] == choice["chosen_lr"]
        best = max(choice["candidates"], key=lambda c: (c["validation_accuracy"], -c["validation_loss"], -c["lr"]))
        assert best["lr"] == r["lr"], "the lr must be the best on the validation shots"
        assert r["memory"]["peak_reset"] and r["memory"]["rss_added_bytes"] > 0
        assert r["memory"]["rss_added_with_loading_bytes"] >= r["memory"]["rss_added_bytes"] > 0
        assert r["threads"]["onnxruntime"]["intra_op_num_threads"] == 1
        if r["row"] != "full_manual_ort":
            assert r["head_difference"] == 0.0, "every row must start from the episode's head"
    by = {(r["row"], r["episode"]): r for r in records}
    for episode in (0, 1):  # edgeplug's full fine-tune and the same artifacts built by hand train alike
        mine = [c["extra"]["train_loss"] for c in by[("full", episode)]["lr_choice"]["candidates"]]
        theirs = [c["extra"]["train_loss"] for c in by[("full_manual_ort", episode)]["lr_choice"]["candidates"]]
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-5), (mine, theirs)
        assert by[("biases", episode)]["trainable_values"] < by[("full", episode)]["trainable_values"]
    text = report.markdown(result)
    assert "full_manual_ort" in text and not any(math.isnan(r["accuracy"]) for r in records)


def test_image_domains_load_as_documented(tmp_path: Path) -> None:
    """The image family's loaders (scikit-image/scikit-learn parts; elpv is checked by the bench itself)."""
    pytest.importorskip("skimage")
    pytest.importorskip("PIL")
    from bench.images import data

    for name, count, classes in (("textures", 192, 3), ("faces", 200, 2), ("digits", 1797, 5)):
        pool = data.load_pool(name, 32, cache=tmp_path)
        assert pool.images.shape == (count, 32, 32) and pool.images.dtype == np.uint8
        assert len(pool.domain.eligible(2)) == classes
        again = data.load_pool(name, 32, cache=tmp_path)  # from the cache
        assert np.array_equal(again.images, pool.images) and np.array_equal(again.domain.labels, pool.domain.labels)
    x = data.to_input(pool.images[:3])
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert set(pool.domain.classes) == set(data.DIGITS_NOVEL)


def test_only_keeps_the_head_row() -> None:
    """Every run records the untrained head per episode; tables list it whatever --only says (unless --skip)."""
    assert [r.name for r in rows.select_rows("images", ["full", "last_layer"], torch=False)][0] == "head_only"
    assert "head_only" not in [r.name for r in rows.select_rows("images", ["full"], ["head_only"], torch=False)]


def test_query_chunks_count_the_chosen_candidates_test_predictions(tmp_path: Path) -> None:
    """`query_chunk`: the manual and recipe rows record correct query predictions per chunk, summing to the accuracy;
    bench/text_full.py's paired interval over those chunks is exact for identical rows."""
    import dataclasses

    from bench.text_full import compare

    family = _family(tmp_path)
    family = dataclasses.replace(family, episodes=family.episodes[:1])
    chosen = rows.select_rows("images", ["full_manual_ort", "last_layer"], torch=False)
    result = run_family(family, chosen, tmp_path / "work", echo=lambda text: None, query_chunk=3)
    by = {r["row"]: r for r in result["records"]}
    for name in ("full_manual_ort", "last_layer"):
        r = by[name]
        assert "error" not in r, r.get("error")
        counts = r["query_chunk_correct"]
        assert len(counts) == -(-r["query_size"] // 3) and all(0 <= c <= 3 for c in counts)
        assert sum(counts) == round(r["accuracy"] * r["query_size"])
    same = compare({"a": by["last_layer"], "b": by["last_layer"]}, "a", "b", 3, 0)
    assert same is not None and same["bootstrap"]["mean"] == 0.0 and same["within_margin_shown"]
    pair = compare(by, "last_layer", "full_manual_ort", 3, 0)
    assert pair is not None and math.isclose(pair["bootstrap"]["mean"], by["last_layer"]["accuracy"] - by["full_manual_ort"]["accuracy"], abs_tol=1e-9)


def test_row_grids_replace_a_rows_grid_for_one_run_and_unknown_rows_are_refused() -> None:
    from bench.run import with_row_grids

    chosen = rows.select_rows("text", ["last_layer", "full_manual_ort"])
    out = {r.name: r.lr_grid for r in with_row_grids(chosen, ["full_manual_ort=3e-5,1e-4"])}
    assert out["full_manual_ort"] == (3e-5, 1e-4) and out["last_layer"] is None and out["head_only"] is None
    with pytest.raises(SystemExit, match="no trained row head_only"):
        with_row_grids(chosen, ["head_only=1e-3"])
    with pytest.raises(SystemExit, match="give ROW=LR"):
        with_row_grids(chosen, ["last_layer=fast"])


def test_text_full_schedule_reaches_recipe_rows_and_keeps_their_optimizer() -> None:
    """bench/text_full.py --schedule: recipe rows get it as optimizer.schedule (a valid recipe), built-in rows are untouched."""
    from bench.text_full import with_schedule
    from edgeplug.recipe import recipe_from_dict

    spec = {"name": "linear", "warmup_steps": 8}
    chosen = {r.name: r for r in rows.select_rows("text", ["full_manual_ort", "lora_all_int8_compact"], torch=False)}
    lora = with_schedule(chosen["lora_all_int8_compact"], spec)
    assert lora.recipe is not None and lora.recipe["optimizer"] == {"name": "adamw", "schedule": spec}
    assert recipe_from_dict(dict(lora.recipe), source="test").schedule == spec
    assert chosen["lora_all_int8_compact"].recipe["optimizer"] == {"name": "adamw"}  # the shipped row is not modified
    assert with_schedule(chosen["full_manual_ort"], spec) is chosen["full_manual_ort"]
    assert with_schedule(chosen["lora_all_int8_compact"], None) is chosen["lora_all_int8_compact"]


def _mlp_family(tmp_path: Path) -> Family:
    """One episode of 3 blob classes on a 2-hidden-layer MLP (Gemm layers LoRA can adapt)."""
    from builders import mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(features=6, hidden=(12, 10), classes=5, seed=2), str(path))
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    x = (rng.normal(0, 1, (3, 6))[labels] + 0.9 * rng.normal(0, 1, (len(labels), 6))).astype(np.float32)
    episode = sample_episodes([Domain("blobs", labels)], 1, EpisodeConfig(ways=(3, 3), shots=(8, 8), query=6), seed=0)[0]

    return Family("mlp", "mlp", path, [episode], _npz_writer(x), Settings(steps=6, batch_size=4, grid=(1e-2, 3e-2), threads=1))


def test_training_seeds_change_every_rows_run_and_the_same_seed_repeats_it(tmp_path: Path) -> None:
    """bench/text_full.py --train-seeds: the training seed reaches the hand-built loop (sample order) and edgeplug recipe
    rows (Trainer's sample order and the seed option of the row's passes: LoRA's adapter init); seed 0 is the old run."""
    import dataclasses

    from bench.text_full import with_train_seed

    family = _mlp_family(tmp_path)
    lora = rows.Row("lora", "lora", "recipe", recipe={"loss": "cross-entropy", "optimizer": {"name": "adamw"},
                                                        "passes": [{"name": "lora", "options": {"rank": 2}}]})
    chosen = [r for r in rows.select_rows("images", ["full_manual_ort"], torch=False) if r.trains] + [lora]

    def losses(train_seed: int | None, work: str) -> dict[str, list[float]]:
        seeded = dataclasses.replace(family, settings=dataclasses.replace(family.settings, train_seed=train_seed))
        result = run_family(seeded, [with_train_seed(r, train_seed or 0) for r in chosen], tmp_path / work, echo=lambda text: None)
        by = {r["row"]: r for r in result["records"] if r["row"] != "head_only"}
        assert not [r for r in by.values() if "error" in r], [r.get("error") for r in by.values()]
        return {name: [c["extra"]["train_loss"] for c in r["lr_choice"]["candidates"]] for name, r in by.items()}

    zero, one, again, default = losses(0, "a"), losses(1, "b"), losses(1, "c"), losses(None, "d")
    for name in ("full_manual_ort", "lora"):
        assert not np.allclose(zero[name], one[name]), f"{name}: training seeds 0 and 1 trained alike: the seed is ignored"
        assert np.allclose(one[name], again[name], rtol=1e-6, atol=1e-7), f"{name}: the same training seed must repeat the run"
        assert np.allclose(zero[name], default[name], rtol=1e-6, atol=1e-7), f"{name}: seed 0 must be the run without --train-seeds"
    seeded = with_train_seed(lora, 3)
    assert seeded.recipe["passes"][0]["options"] == {"rank": 2, "seed": 3} and lora.recipe["passes"][0]["options"] == {"rank": 2}
    full = next(r for r in chosen if r.name == "full_manual_ort")
    assert with_train_seed(full, 3) is full


def _seed_record(seed: int, validation: dict[float, float], test: dict[float, float], chunks: dict[float, list[int]]) -> dict:
    own = max(validation, key=lambda lr: (validation[lr], -lr))
    candidates = [{"lr": lr, "validation_accuracy": v, "validation_loss": 1.0, "query_accuracy": test[lr], "query_loss": 1.0, "extra": {}}
                  for lr, v in validation.items()]
    return {"row": "r", "episode": 0, "query_size": 6, "accuracy": test[own], "lr": own, "lr_choice": {"chosen_lr": own, "candidates": candidates},
            "query_chunk_correct": chunks[own], "query_chunk_correct_by_lr": {repr(lr): c for lr, c in chunks.items()},
            "memory": {"peak_rss_bytes": 100 + seed, "rss_added_bytes": 10 + seed}, "median_step_seconds": 0.1 * (seed + 1), "fit_seconds": 5.0}


def test_seed_averaged_rows_choose_the_lr_on_the_mean_validation_accuracy() -> None:
    """Two of three seeds prefer 1e-3 by a hair, the third prefers 1e-2 by far: the mean picks 1e-2 (a per-seed vote
    would pick 1e-3); test accuracy and per-chunk correctness are the seeds' means at 1e-2."""
    from bench.text_full import combine_seeds, compare

    runs = {0: _seed_record(0, {1e-3: 0.60, 1e-2: 0.59}, {1e-3: 0.5, 1e-2: 4 / 6}, {1e-3: [2, 1], 1e-2: [3, 1]}),
            1: _seed_record(1, {1e-3: 0.60, 1e-2: 0.59}, {1e-3: 0.5, 1e-2: 3 / 6}, {1e-3: [1, 2], 1e-2: [2, 1]}),
            2: _seed_record(2, {1e-3: 0.50, 1e-2: 0.70}, {1e-3: 2 / 6, 1e-2: 5 / 6}, {1e-3: [1, 1], 1e-2: [3, 2]})}
    assert [r["lr"] for r in runs.values()] == [1e-3, 1e-3, 1e-2]
    row = combine_seeds(runs)
    assert row["lr"] == 1e-2 and row["lr_choice"]["chosen_lr"] == 1e-2
    assert math.isclose(row["accuracy"], 2 / 3) and row["query_chunk_correct"] == [8 / 3, 4 / 3]
    assert [c["validation_accuracy"] for c in row["lr_choice"]["candidates"]] == pytest.approx([np.mean([0.6, 0.6, 0.5]), np.mean([0.59, 0.59, 0.7])])
    assert [p["own_choice_lr"] for p in row["per_seed"]] == [1e-3, 1e-3, 1e-2] and row["train_seeds"] == [0, 1, 2]
    assert row["memory"]["peak_rss_bytes"] == 101 and math.isclose(row["median_step_seconds"], 0.2)
    other = {**row, "row": "o", "query_chunk_correct": [2.0, 1.0]}
    pair = compare({"r": row, "o": other}, "r", "o", 3, 0)
    assert pair is not None and math.isclose(pair["bootstrap"]["mean"], (8 / 3 + 4 / 3 - 3) / 6)
    with pytest.raises(ValueError, match="not tried with every seed"):
        combine_seeds({**runs, 3: _seed_record(3, {1e-3: 0.6}, {1e-3: 0.5}, {1e-3: [1, 2]})})


def test_extending_a_seeded_run_adds_lrs_per_seed_and_chooses_again_on_the_mean() -> None:
    """bench/text_full.py --extend: a grid widened at its edge joins the earlier lrs seed by seed; the choice is made
    again on the mean over all lrs, and the earlier memory/step figures stay."""
    from bench.text_full import combine_seeds, extend

    earlier_row = combine_seeds({0: _seed_record(0, {1e-3: 0.5, 1e-2: 0.6}, {1e-3: 0.5, 1e-2: 0.5}, {1e-3: [1, 2], 1e-2: [2, 1]}),
                                 1: _seed_record(1, {1e-3: 0.5, 1e-2: 0.6}, {1e-3: 0.5, 1e-2: 0.5}, {1e-3: [1, 2], 1e-2: [2, 1]})})
    assert earlier_row["lr"] == 1e-2
    new_row = combine_seeds({0: _seed_record(5, {2e-2: 0.7}, {2e-2: 1.0}, {2e-2: [3, 3]}),
                             1: _seed_record(6, {2e-2: 0.6}, {2e-2: 0.5}, {2e-2: [1, 2]})})
    meta = {"grids": {"r": [1e-3, 1e-2]}, "rows": [{"name": "r"}], "train_seeds_done": [0, 1]}
    merged = extend({"meta": meta, "records": [earlier_row], "prepare": []},
                    {"meta": {**meta, "command": "x"}, "records": [new_row], "prepare": []}, "earlier.json")["records"][0]
    assert [c["lr"] for c in merged["lr_choice"]["candidates"]] == [1e-3, 1e-2, 2e-2]
    assert merged["lr"] == 2e-2 and math.isclose(merged["accuracy"], 0.75) and merged["query_chunk_correct"] == [2.0, 2.5]
    assert merged["memory"]["peak_rss_bytes"] == earlier_row["memory"]["peak_rss_bytes"]
    assert [p["own_choice_lr"] for p in merged["per_seed"]] == [2e-2, 1e-2]
def test_text_full_takes_compared_rows_only_from_runs_of_the_same_split(tmp_path: Path) -> None:
    """bench/text_full.py --also ROW@JSON: an earlier run of another split, epoch count or schedule is refused; the
    table names each row's prefix-cache storage (records from before the option stored float32)."""
    import argparse
    import json

    from bench.text_full import cache_cell, same_split

    args = argparse.Namespace(seed=0, train=600, validation=200, epochs=2, schedule={"name": "linear", "warmup_steps": 8}, train_seeds=None)
    split = {"seed": 0, "train": 600, "validation": 200, "test": 1425, "epochs": 2, "schedule": args.schedule}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": {"split": split}, "records": []}))
    assert same_split(path, args)["meta"]["split"] == split
    for change in ({"epochs": 1}, {"train": 1200}, {"schedule": None}, {"train_seeds": [0, 1]}):
        path.write_text(json.dumps({"meta": {"split": {**split, **change}}, "records": []}))
        with pytest.raises(SystemExit, match="another|other training seeds"):
            same_split(path, args)
    stats = {"memory_bytes": 113 * 2**20, "seconds": 90.6}
    assert cache_cell({**stats, "dtype": "float16"}) == "float16, 113 MiB, fill 91 s"
    assert cache_cell(stats).startswith("float32") and cache_cell(None) == "–"
    assert cache_cell({"reason": "fewer than two epochs left to train"}).startswith("not used: fewer")
