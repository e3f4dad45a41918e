"""Forward-only personalisation on the device, the baselines the generator must beat.

- `stats`: re-estimate every BatchNormalization's mean and variance on the device's
  unlabelled data (AdaBN), layer by layer so each layer sees the re-normalised
  output of the ones before it.
- `prototype`: T3A-like: features before the classifier, pseudo-labelled by the
  model, the most confident per class (plus the classifier's own weight vectors as
  supports) averaged into class prototypes that become the classifier.
"""

from __future__ import annotations

import numpy as np

from edgeplug.plugin_api import ModelError

from .device import DeviceModel

PROTOTYPE_FILTER = 20  # supports kept per class (T3A's M): the lowest-entropy ones


def statistics(device: DeviceModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """New running mean and variance for every normalisation layer, from the device samples."""
    manifest = device.manifest
    names = {slot.name for slot in manifest.slots if slot.role == "statistics"}
    norms = [n for n in manifest.norms if n.mean in names and n.var in names]
    if not norms:
        raise ModelError("the stats baseline needs BatchNormalization statistics slots; rewrite with "
                         "personalize option statistics: true on a model whose batch norms are not folded")
    values: dict[str, np.ndarray] = {}
    for norm in norms:
        (activation,) = device.run(x, [norm.input], values)
        axes = (0, *range(2, activation.ndim))
        dtype = manifest.slot(norm.mean).dtype
        values[norm.mean] = activation.mean(axis=axes, dtype=np.float64).astype(dtype)
        values[norm.var] = activation.var(axis=axes, dtype=np.float64).astype(dtype)
    return values


def prototype(device: DeviceModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """Classifier weight (and zero bias) from confident pseudo-labelled class prototypes."""
    manifest = device.manifest
    classifier = manifest.classifier
    names = {slot.name for slot in manifest.parameter_slots()}
    if classifier is None or classifier.weight not in names:
        raise ModelError("the prototype baseline needs the classifier as a slot; rewrite with personalize slots: [classifier, ...]")
    features, logits = device.run(x, [classifier.input, manifest.output])
    features = features.reshape(len(features), -1).astype(np.float64)
    weight = device.defaults()[classifier.weight].astype(np.float64)
    class_vectors = weight if classifier.transposed else weight.T  # [classes, features]
    probabilities = _softmax(logits.astype(np.float64))
    entropy = -(probabilities * np.log(probabilities + 1e-12)).sum(axis=1)
    labels = probabilities.argmax(axis=1)
    prototypes = []
    for c, vector in enumerate(class_vectors):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(entropy[members])][:PROTOTYPE_FILTER]
        supports = np.vstack([_unit(vector[None]), _unit(features[members])])
        prototypes.append(_unit(supports.mean(axis=0, keepdims=True))[0])
    new_weight = np.array(prototypes) * np.linalg.norm(class_vectors, axis=1).mean()
    dtype = manifest.slot(classifier.weight).dtype
    values = {classifier.weight: (new_weight if classifier.transposed else new_weight.T).astype(dtype)}
    if classifier.bias is not None and classifier.bias in names:
        values[classifier.bias] = np.zeros(manifest.slot(classifier.bias).shape, dtype=manifest.slot(classifier.bias).dtype)
    return values


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
