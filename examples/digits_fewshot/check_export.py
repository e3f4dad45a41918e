"""Check the exported model in plain onnxruntime inference: accuracy on the query set.

    python examples/digits_fewshot/check_export.py MODEL.onnx QUERY.npz [LABEL]
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime


def main() -> int:
    model_path, query_path = sys.argv[1:3]
    label = sys.argv[3] if len(sys.argv) > 3 else "exported model"
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    query = np.load(query_path)
    logits = session.run(None, {session.get_inputs()[0].name: query["image"]})[0]
    accuracy = float((logits.argmax(axis=1) == query["y"]).mean())
    ops = sorted({node.op_type for node in __import__("onnx").load(model_path).graph.node})
    print(f"{label}: {model_path} (ops: {', '.join(ops)}); query accuracy in onnxruntime inference: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
