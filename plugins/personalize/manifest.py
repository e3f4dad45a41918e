"""What the device model exposes to personalisation: its slots, feature taps and fingerprint.

The `personalize` pass writes `passes/personalize/device.onnx` (the inference model
with every slot as a graph input whose default is the original value) and
`passes/personalize/slots.json` (this manifest). Everything downstream (anchors,
baselines, the generator, slot files) checks the fingerprint, so values made for
one model are never applied to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeplug.plugin_api import DataError, ModelError, first_error, load_schema

PASS_NAME = "personalize"
DEVICE_MODEL = "device.onnx"
MANIFEST = "slots.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Slot:
    """One replaceable tensor: `role` is 'parameter' (generated, fine-tuned) or 'statistics' (re-estimated)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    group: str

    @property
    def size(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclasses.dataclass(frozen=True)
class Feature:
    """A tensor whose per-channel spatial mean (and std, for rank > 2) describes a sample."""

    tensor: str
    channels: int
    rank: int

    @property
    def width(self) -> int:
        return self.channels * (2 if self.rank > 2 else 1)


@dataclasses.dataclass(frozen=True)
class Norm:
    """A BatchNormalization whose statistics the stats baseline re-estimates."""

    node: str
    input: str
    scale: str
    bias: str
    mean: str
    var: str
    epsilon: float


@dataclasses.dataclass(frozen=True)
class Classifier:
    """The last Gemm/MatMul: its input are the features a prototype classifier is built on."""

    node: str
    input: str
    weight: str
    bias: str | None
    transposed: bool  # weight is [classes, features] (Gemm transB=1) rather than [features, classes]


@dataclasses.dataclass(frozen=True)
class Manifest:
    fingerprint: str
    input: str
    input_shape: tuple[int | str | None, ...]
    input_dtype: str
    output: str
    slots: tuple[Slot, ...]
    features: tuple[Feature, ...]
    norms: tuple[Norm, ...]
    classifier: Classifier | None

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    def parameter_slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.role == "parameter")

    @property
    def feature_width(self) -> int:
        return sum(f.width for f in self.features)

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["format_version"] = FORMAT_VERSION
        return document


def fingerprint(model_bytes: bytes) -> str:
    """sha256 of the serialised device model: slot files and anchors carry it."""
    return hashlib.sha256(model_bytes).hexdigest()


def manifest_from_dict(document: Mapping[str, Any], source: str) -> Manifest:
    error = first_error(document, load_schema("personalize-manifest"))
    if error is not None:
        raise ModelError(f"{source}: {error}; rerun edgeplug rewrite with the personalize pass")
    classifier = document["classifier"]
    return Manifest(
        fingerprint=document["fingerprint"],
        input=document["input"],
        input_shape=tuple(document["input_shape"]),
        input_dtype=document["input_dtype"],
        output=document["output"],
        slots=tuple(Slot(s["name"], tuple(s["shape"]), s["dtype"], s["role"], s["group"]) for s in document["slots"]),
        features=tuple(Feature(f["tensor"], f["channels"], f["rank"]) for f in document["features"]),
        norms=tuple(Norm(**n) for n in document["norms"]),
        classifier=Classifier(**classifier) if classifier is not None else None,
    )


def pass_dir(artifacts: str | Path) -> Path:
    """`ARTIFACTS/passes/personalize`, or an error saying how to make it."""
    folder = Path(artifacts) / "passes" / PASS_NAME
    if not (folder / MANIFEST).is_file() or not (folder / DEVICE_MODEL).is_file():
        if not Path(artifacts).is_dir():
            raise DataError(f"artifact folder not found: {artifacts}")
        raise ModelError(f"{artifacts} has no personalisation slots ({folder / MANIFEST} missing); "
                         "rewrite the model with a recipe that runs the 'personalize' pass")
    return folder


def load_manifest(artifacts: str | Path) -> tuple[Manifest, Path]:
    """The manifest and the device model path of an artifact folder; the model must match the fingerprint."""
    folder = pass_dir(artifacts)
    try:
        document = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{folder / MANIFEST} is unreadable ({error}); rerun edgeplug rewrite") from None
    manifest = manifest_from_dict(document, str(folder / MANIFEST))
    model_path = folder / DEVICE_MODEL
    if fingerprint(model_path.read_bytes()) != manifest.fingerprint:
        raise ModelError(f"{model_path} does not match the fingerprint in {folder / MANIFEST} (edited after the rewrite?); "
                         "rerun edgeplug rewrite")
    return manifest, model_path
