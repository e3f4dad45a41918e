"""Meta-Dataset-style few-shot episodes: a different task each time.

Why: a task-adaptive method has nothing to adapt to when every episode is the same
task. Each episode here picks a domain (round robin), a number of ways, a subset of
that domain's classes in a random label order, and a number of shots; its query set
is disjoint from its support set, and a few shots per class are held out of the
support set as validation shots, on which each row chooses its learning rate.

Episodes hold indices into a domain's own arrays (the workload keeps the data), so they
are cheap to pass to child processes (`Episode.to_dict` / `Episode.from_dict`) and the
same episodes serve every row: comparisons are paired.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Domain:
    """A pool of labelled samples from one source; `labels[i]` is the class of sample i.

    `classes` restricts which classes episodes may draw (a novel-class split); by default
    every class with enough samples. `class_names` is for reports only.
    """

    name: str
    labels: np.ndarray
    classes: tuple[int, ...] | None = None
    class_names: Mapping[int, str] | None = None

    def eligible(self, minimum: int) -> list[int]:
        """Classes allowed in episodes that have at least `minimum` samples."""
        labels = np.asarray(self.labels)
        allowed = self.classes if self.classes is not None else sorted(int(c) for c in np.unique(labels))
        return [int(c) for c in allowed if int((labels == c).sum()) >= minimum]


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """Ranges are inclusive and capped by what a domain has.

    ways: classes per episode. shots: support samples per class (the same for every class
    of an episode, drawn per episode). query: query samples per class (fewer when a class
    runs out; then every class of the episode gets that fewer, to keep the query balanced).
    validation: fraction of each class's shots held out of training for the learning-rate
    choice (at least 1, and at least 1 shot always trains).
    """

    ways: tuple[int, int] = (2, 5)
    shots: tuple[int, int] = (2, 10)
    query: int = 10
    validation: float = 0.25

    def __post_init__(self) -> None:
        if not 2 <= self.ways[0] <= self.ways[1]:
            raise ValueError(f"ways must be a range (lo, hi) with 2 <= lo <= hi, got {self.ways}")
        if not 1 <= self.shots[0] <= self.shots[1]:
            raise ValueError(f"shots must be a range (lo, hi) with 1 <= lo <= hi, got {self.shots}")
        if self.query < 1:
            raise ValueError(f"query must be at least 1, got {self.query}")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"validation must be a fraction in [0, 1), got {self.validation}")
        if self.validation > 0 and self.shots[0] < 2:
            raise ValueError("validation shots need at least 2 shots per class (one trains, one validates)")

    def validation_shots(self, shots: int) -> int:
        if self.validation == 0:
            return 0
        return min(shots - 1, max(1, math.floor(shots * self.validation + 0.5)))


@dataclasses.dataclass(frozen=True)
class Episode:
    """One task. Labels are episode labels 0..ways-1; `classes[k]` is the domain class of label k.

    `train` + `validation` is the support set; the query set is disjoint from both.
    """

    index: int
    domain: str
    domain_episode: int
    seed: tuple[int, ...]
    classes: tuple[int, ...]
    shots: int
    train: np.ndarray
    train_labels: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    class_names: tuple[str, ...] = ()

    @property
    def ways(self) -> int:
        return len(self.classes)

    def splits(self) -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
        """(name, domain indices, episode labels) of train, validation and query: what a family writes per episode."""
        return (("train", self.train, self.train_labels), ("validation", self.validation, self.validation_labels),
                ("query", self.query, self.query_labels))

    @property
    def support(self) -> np.ndarray:
        return np.concatenate([self.train, self.validation])

    @property
    def support_labels(self) -> np.ndarray:
        return np.concatenate([self.train_labels, self.validation_labels])

    def describe(self) -> str:
        names = ", ".join(self.class_names) if self.class_names else ", ".join(map(str, self.classes))
        return (f"episode {self.index} ({self.domain} #{self.domain_episode}): {self.ways}-way {self.shots}-shot "
                f"[{names}], train {len(self.train)} / validation {len(self.validation)} / query {len(self.query)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.tolist() if isinstance(value, np.ndarray) else (list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Episode:
        arrays = {"train", "train_labels", "validation", "validation_labels", "query", "query_labels"}
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = data[field.name] if field.name in data else field.default
            if field.name in arrays:
                value = np.asarray(value, dtype=np.int64)
            elif field.name in ("seed", "classes", "class_names"):
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs)


def sample_episode(domain: Domain, config: EpisodeConfig, *, seed: int, index: int = 0, domain_episode: int = 0) -> Episode:
    """One episode of `domain`, fully determined by (seed, domain name, domain_episode)."""
    key = (seed, zlib.crc32(domain.name.encode("utf-8")), domain_episode)
    rng = np.random.default_rng(key)
    labels = np.asarray(domain.labels)
    minimum = config.shots[0] + 1  # every class needs its shots plus one query sample
    eligible = domain.eligible(minimum)
    if len(eligible) < 2:
        raise ValueError(f"domain {domain.name!r}: fewer than 2 classes with {minimum} samples; lower the shots")
    ways = int(rng.integers(min(config.ways[0], len(eligible)), min(config.ways[1], len(eligible)) + 1))
    classes = [int(c) for c in rng.choice(eligible, size=ways, replace=False)]
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    smallest = min(len(m) for m in members)
    shots = int(rng.integers(config.shots[0], min(config.shots[1], smallest - 1) + 1))
    query = min(config.query, smallest - shots)
    held = config.validation_shots(shots)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "query": []}
    for pool in members:
        parts["train"].append(pool[: shots - held])
        parts["validation"].append(pool[shots - held : shots])
        parts["query"].append(pool[shots : shots + query])

    def join(name: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = parts[name]
        indices = np.concatenate(arrays).astype(np.int64)
        tags = np.concatenate([np.full(len(a), label, dtype=np.int64) for label, a in enumerate(arrays)])
        return indices, tags

    (train, train_labels), (validation, validation_labels), (query_idx, query_labels) = join("train"), join("validation"), join("query")
    names = tuple(str((domain.class_names or {}).get(c, c)) for c in classes)
    return Episode(index, domain.name, domain_episode, key, tuple(classes), shots, train, train_labels,
                   validation, validation_labels, query_idx, query_labels, names)


def sample_episodes(domains: Sequence[Domain], per_domain: int, config: EpisodeConfig | None = None, *, seed: int = 0) -> list[Episode]:
    """`per_domain` episodes of every domain, interleaved domain by domain (episode k of every
    domain before episode k+1 of any), so that a run cut short still covers every domain.

    Episode k of a domain does not depend on the other domains or on `per_domain`: a longer
    run extends a shorter one.
    """
    config = config or EpisodeConfig()
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique: {names}")
    episodes = []
    for k in range(per_domain):
        for domain in domains:
            episodes.append(sample_episode(domain, config, seed=seed, index=len(episodes), domain_episode=k))
    return episodes


def continue_episodes(episodes: Sequence[Episode], *, start: int = 0, domains: Sequence[str] | None = None) -> list[Episode]:
    """The episodes of a draw from episode `start` of each domain on, of `domains` only (default: every domain).

    Every kept episode keeps its id (`index`, also the seed of its rows' sample order) and its draw (episode k of
    a domain depends only on (seed, domain name, k)): a run of these continues an earlier run of the same draw
    with no episode repeated, and its results can be appended to that run's (`bench/merge_runs.py --append`).
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    present = {e.domain for e in episodes}
    unknown = sorted(set(domains or ()) - present)
    if unknown:
        raise ValueError(f"no episodes of {unknown} in this draw (domains: {sorted(present)})")
    return [e for e in episodes if e.domain_episode >= start and (domains is None or e.domain in domains)]
