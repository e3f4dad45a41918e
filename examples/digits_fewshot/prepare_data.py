"""Write the few-shot task: a 10-way K-shot support set and a query set from held-out digits.

The pretrained CNN saw only classes 0-4 from the other half of the data.

    python examples/digits_fewshot/prepare_data.py OUT_DIR [--shots 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import digits_split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, _, x, y = digits_split()
    rng = np.random.default_rng(args.seed)
    support = np.concatenate([rng.choice(np.flatnonzero(y == label), args.shots, replace=False) for label in range(10)])
    query = np.setdiff1d(np.arange(len(y)), support)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "support.npz", image=x[support], y=y[support])
    np.savez(args.out / "query.npz", image=x[query], y=y[query])
    print(f"support: {len(support)} images ({args.shots} per class), query: {len(query)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
