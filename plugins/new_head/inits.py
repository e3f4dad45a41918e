"""Initial weights of a new head: [classes, in_features] and [classes], in float64.

A random head on a pretrained backbone is the classic way to ruin fine-tuning: the
large early gradients through a random classifier wreck the features (measured: one
AdamW step at lr 1e-3 collapses EfficientNet-Lite0's penultimate features). Starting
from the support set's class prototypes, or from a linear probe fitted on the frozen
features (LP-FT, Kumar et al. 2022), gives fine-tuning a head that already agrees
with the features.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Features whose spread over the support set is below this (relative to the largest) are
# constant: they are left out of the probe's standardisation instead of blown up.
_CONSTANT_FEATURE = 1e-8


@dataclasses.dataclass(frozen=True)
class HeadInit:
    weight: np.ndarray  # [classes, in_features]
    bias: np.ndarray  # [classes]
    details: dict[str, float | int]


def zeros(classes: int, in_features: int) -> HeadInit:
    return HeadInit(np.zeros((classes, in_features)), np.zeros(classes), {})


def random(classes: int, in_features: int, seed: int) -> HeadInit:
    """torch.nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(in_features)
    return HeadInit(rng.uniform(-bound, bound, (classes, in_features)), rng.uniform(-bound, bound, classes), {})


def prototypes(features: np.ndarray, labels: np.ndarray, classes: int, scale: float) -> HeadInit:
    """Cosine classifier on centred features: row c is the normalised mean of class c's normalised, centred features.

    logits_c(f) = scale * <p_c, f - m> / r, with m the support set's mean feature and r
    the mean norm of the centred features: for a feature of typical norm, scale times
    the cosine to the prototype. The centring (folded into the bias, -W m) matters for
    post-ReLU/Swish features, whose class means all point the same way.
    """
    mean = features.mean(axis=0)
    centred = features - mean
    norms = np.linalg.norm(centred, axis=1)
    radius = float(norms.mean())
    if radius == 0.0:
        raise ValueError("every support sample has the same penultimate features (they carry no class information)")
    unit = centred / np.maximum(norms, radius * 1e-6)[:, None]
    weight = np.zeros((classes, features.shape[1]))
    for c in range(classes):
        prototype = unit[labels == c].mean(axis=0)
        length = np.linalg.norm(prototype)
        weight[c] = prototype / length if length > 0 else prototype
    weight *= scale / radius
    return HeadInit(weight, -weight @ mean, {"feature_mean_norm": float(np.linalg.norm(features, axis=1).mean()),
                                              "centred_mean_norm": radius})


def linear_probe(features: np.ndarray, labels: np.ndarray, classes: int, l2: float,
                 max_steps: int = 3000, tolerance: float = 1e-6) -> HeadInit:
    """Multinomial logistic regression on standardised features, folded back to raw features.

    Minimises mean cross-entropy + l2/2 |W|^2 (bias not penalised) by Nesterov's
    accelerated gradient with a fixed step of 1/L (Böhning's bound on the softmax
    Hessian: L = |X|_2^2 / (2n) + l2), restarted when the loss goes up. Convex: the
    result does not depend on the start; stops when the gradient's norm is below
    `tolerance` times its first value.
    """
    n, width = features.shape
    mean = features.mean(axis=0)
    spread = features.std(axis=0)
    spread = np.where(spread > _CONSTANT_FEATURE * max(float(spread.max()), 1e-30), spread, np.inf)
    x = np.concatenate([(features - mean) / spread, np.ones((n, 1))], axis=1)  # the last column: the bias
    onehot = np.eye(classes)[labels]
    penalty = np.full(width + 1, l2)
    penalty[-1] = 0.0
    lipschitz = float(np.linalg.norm(x, ord=2) ** 2) / (2 * n) + l2
    step = 1.0 / lipschitz

    def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
        logits = x @ w
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -float((onehot * log_probs).sum()) / n + 0.5 * float((penalty[:, None] * w * w).sum())
        gradient = x.T @ (np.exp(log_probs) - onehot) / n + penalty[:, None] * w
        return loss, gradient

    w = np.zeros((width + 1, classes))
    previous, momentum = w, 1.0
    loss, gradient = loss_and_gradient(w)
    first = float(np.linalg.norm(gradient)) or 1.0
    steps = 0
    for steps in range(1, max_steps + 1):
        _, g = loss_and_gradient(w)
        candidate = w - step * g
        new_loss, gradient = loss_and_gradient(candidate)
        if new_loss > loss:  # restart the momentum (O'Donoghue & Candès)
            momentum, w = 1.0, previous
            continue
        next_momentum = (1 + np.sqrt(1 + 4 * momentum * momentum)) / 2
        w = candidate + (momentum - 1) / next_momentum * (candidate - previous)
        previous, momentum, loss = candidate, next_momentum, new_loss
        if np.linalg.norm(gradient) < tolerance * first:
            break
    weight = (previous[:-1] / spread[:, None]).T  # [classes, width]; constant features (spread inf) get 0
    bias = previous[-1] - weight @ mean
    accuracy = float((np.argmax(features @ weight.T + bias, axis=1) == labels).mean())
    return HeadInit(weight, bias, {"probe_loss": round(loss, 6), "probe_steps": steps, "probe_train_accuracy": accuracy})
