"""The benchmark's rows, driver and report (bench/protocol): recipe rows are valid, the report names no
winner across zero, and a whole run on a tiny model keeps the protocol's promises (same head for every
row, lr chosen on validation shots, memory at the ready point, edgeplug = onnxruntime by hand)."""

from __future__ import annotations

import math
import sys
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

    def write(episode: Episode, folder: Path) -> dict[str, Path]:
        out = {}
        for split, idx, lab in (("train", episode.train, episode.train_labels), ("validation", episode.validation, episode.validation_labels),
                                ("query", episode.query, episode.query_labels)):
            out[split] = folder / f"{split}.npz"
            np.savez(out[split], x=images[idx], y=lab)
        return out

    return Family("tiny", "tiny", path, episodes, write, Settings(steps=3, batch_size=4, grid=(1e-3, 3e-2), threads=1))


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
