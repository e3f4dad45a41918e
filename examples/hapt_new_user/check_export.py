"""Check the exported model in plain onnxruntime inference: accuracy on the query set.

    python examples/hapt_new_user/check_export.py MODEL.onnx QUERY.npz
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime


def main() -> int:
    model_path, query_path = sys.argv[1:3]
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    query = np.load(query_path)
    logits = session.run(None, {session.get_inputs()[0].name: query["x"]})[0]
    accuracy = float((logits.argmax(axis=1) == query["y"]).mean())
    print(f"exported model: {model_path} ({logits.shape[1]} classes); query accuracy in onnxruntime inference: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
