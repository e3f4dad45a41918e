"""Non-IID splits of a labelled dataset across simulated devices, and the built-in digits data.

`dirichlet:ALPHA` skews labels (each class is spread over the devices with Dirichlet(ALPHA)
proportions; small ALPHA gives devices few classes), `distortion` gives every device all
classes but its own input distortion (shift, contrast, noise), `iid` deals samples evenly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgeplug.errors import DataError, EdgeplugError

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Partition:
    kind: str
    alpha: float = 0.5

    @classmethod
    def parse(cls, text: str) -> Partition:
        kind, _, value = text.partition(":")
        if kind == "dirichlet":
            try:
                alpha = float(value or 0.5)
            except ValueError:
                raise EdgeplugError(f"--partition {text}: the Dirichlet alpha must be a number, e.g. dirichlet:0.5") from None
            if alpha <= 0:
                raise EdgeplugError(f"--partition {text}: the Dirichlet alpha must be positive")
            return cls("dirichlet", alpha)
        if kind in ("iid", "distortion") and not value:
            return cls(kind)
        raise EdgeplugError(f"unknown partition '{text}'; use dirichlet:ALPHA, distortion or iid")


def split(inputs: Arrays, labels: np.ndarray, clients: int, partition: Partition, seed: int = 0,
          min_samples: int = 2) -> list[tuple[Arrays, np.ndarray]]:
    """One (inputs, labels) pair per device; every device gets at least `min_samples` samples."""
    if clients * min_samples > len(labels):
        raise DataError(f"{len(labels)} training samples cannot give {clients} devices {min_samples} samples each; use fewer --clients")
    rng = np.random.default_rng(seed)
    if partition.kind == "dirichlet":
        owners = _dirichlet_owners(labels, clients, partition.alpha, rng, min_samples)
    else:
        owners = rng.permutation(np.arange(len(labels)) % clients)
    parts = []
    for client in range(clients):
        index = np.flatnonzero(owners == client)
        x = {name: array[index] for name, array in inputs.items()}
        if partition.kind == "distortion":
            x = {name: distort(array, np.random.default_rng([seed, client])) for name, array in x.items()}
        parts.append((x, labels[index]))
    return parts


def _dirichlet_owners(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, min_samples: int) -> np.ndarray:
    """Owner of every sample; classes spread by Dirichlet proportions, redrawn until every device has enough."""
    for _ in range(100):
        owners = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            index = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(index)).astype(int)
            for client, chunk in enumerate(np.split(index, cuts)):
                owners[chunk] = client
        if np.bincount(owners, minlength=clients).min() >= min_samples:
            return owners
    raise DataError(f"a Dirichlet({alpha}) label split left a device with fewer than {min_samples} samples in 100 draws; "
                    "use a larger alpha or fewer --clients")


def distort(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A device's own input distortion of image-like data [N, C, H, W]: a shift, a contrast and noise."""
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"--partition distortion needs float image inputs [N, C, H, W], not {x.dtype}{list(x.shape)}")
    dy, dx = rng.integers(-1, 2, size=2)
    shifted = np.roll(x, (int(dy), int(dx)), axis=(2, 3))
    contrast = rng.uniform(0.6, 1.4)
    noisy = shifted * contrast + rng.normal(0.0, rng.uniform(0.0, 0.15), size=x.shape)
    return np.clip(noisy, 0.0, 1.0).astype(x.dtype)


def digits(input_name: str, seed: int = 0, test_share: float = 0.25) -> tuple[Arrays, np.ndarray, Arrays, np.ndarray]:
    """scikit-learn's digits as [N, 1, 8, 8] floats in [0, 1]: (train inputs, labels, test inputs, labels).

    The test samples come from the half the bundled example never pretrains on
    (examples/digits_fewshot/common.py splits with the same permutation).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise EdgeplugError("--dataset digits needs scikit-learn (pip install scikit-learn), or pass --data and --test") from None
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    half = len(y) // 2
    test = order[half:][: int(len(y) * test_share)]
    train = np.setdiff1d(order, test)
    return {input_name: x[train]}, y[train], {input_name: x[test]}, y[test]
