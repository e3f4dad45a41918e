#!/usr/bin/env python
"""Write the source .npz for `edgeplug meta-pretrain` from the image domains that are not targets.

Source tasks (never a target of the images family's default test run on elpv + digits novel):
digits' development classes 0-4 (domain 0), textures (domain 1), faces (domain 2), and 64x64 grey patches
of 12 of scikit-image's sample images, class = the image (domain 3); images at the
model's input size, EfficientNet-Lite scaling ([-1, 1], grey repeated to 3 channels).

  python bench/meta_source.py /tmp/source-128.npz --image-size 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.images.data import DIGITS_DEVELOPMENT, load_pool, to_input  # noqa: E402

SOURCES = ("digits-dev", "textures", "faces", "scenes")
SCENES = ("camera", "astronaut", "coins", "moon", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "cell", "clock", "retina")
"""scikit-image's bundled sample images: class = which image a 64x64 grey patch comes from (at most 64 each)."""
PATCH = 64


def _scenes(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    import skimage.data
    from PIL import Image

    patches, labels = [], []
    for label, name in enumerate(SCENES):
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3:
            image = np.asarray(Image.fromarray(image[..., :3]).convert("L"))
        tiles = [(r, c) for r in range(image.shape[0] // PATCH) for c in range(image.shape[1] // PATCH)][:64]
        for r, c in tiles:
            patch = image[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            patches.append(np.asarray(Image.fromarray(patch).resize((image_size, image_size), Image.BILINEAR)))
            labels.append(label)
    return np.stack(patches).astype(np.uint8), np.asarray(labels, np.int64)


def build(image_size: int) -> dict[str, np.ndarray]:
    xs, ys, domains = [], [], []
    offset = 0
    for number, name in enumerate(SOURCES):
        if name == "scenes":
            images, labels = _scenes(image_size)
        else:
            pool = load_pool(name.removesuffix("-dev"), image_size)
            images, labels = pool.images, pool.domain.labels
        keep = np.isin(labels, DIGITS_DEVELOPMENT) if name == "digits-dev" else np.ones(len(labels), bool)
        xs.append(to_input(images[keep]))
        ys.append(labels[keep] + offset)  # distinct labels across domains
        domains.append(np.full(int(keep.sum()), number, np.int64))
        offset += int(labels.max()) + 1
    return {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64), "domain": np.concatenate(domains)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    arrays = build(args.image_size)
    np.savez(args.out, **arrays)
    counts = {name: int((arrays["domain"] == i).sum()) for i, name in enumerate(SOURCES)}
    print(f"wrote {args.out}: {len(arrays['y'])} examples {counts}, {len(np.unique(arrays['y']))} classes")


if __name__ == "__main__":
    main()
