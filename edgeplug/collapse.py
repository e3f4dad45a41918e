"""Noticing a training run that has collapsed, and saying what usually causes it.

A fine-tuning run can end at chance with exit status 0: a random head on a pretrained
backbone with AdamW at 1e-3 wrecks the features in a step or two, a model whose
BatchNormalization trains on batch statistics scores well on training batches and at
chance in evaluation. Nothing fails, so the trainer looks at the symptoms at every
epoch end (loss stuck at ln(classes), accuracy at chance, outputs that no longer depend
on the input) and warns once, naming the likely causes found in this artifact folder.
It is a warning, not an error: a hard task can look like this too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# outputs whose spread over samples is below this fraction of their size do not depend on the input
CONSTANT_SPREAD = 1e-4
# |loss - ln(classes)| below this fraction of ln(classes) for two epochs, without falling since the
# first epoch, is "stuck at ln(classes)" (a fresh model starts there and moves away)
LOG_CLASSES_TOLERANCE = 0.02


class TrainingWarning(UserWarning):
    """A training run that finished but probably learned nothing useful (see the message)."""


class OutputSpread:
    """Per-class min and max of the logits over every sample seen: are the outputs constant?"""

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.samples = 0

    def add(self, logits: np.ndarray) -> None:
        values = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) if np.ndim(logits) else None
        if values is None or not len(values) or not np.all(np.isfinite(values)):
            return
        low, high = values.min(axis=0), values.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        self.samples += len(values)

    def constant(self) -> bool:
        if self.low is None or self.high is None or self.samples < 2:
            return False
        size = max(float(np.abs(self.low).max()), float(np.abs(self.high).max()))
        return float((self.high - self.low).max()) <= CONSTANT_SPREAD * (1.0 + size)


def chance_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel())
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def at_chance(accuracy: float | None, labels: np.ndarray) -> bool:
    """Within two binomial standard errors (at least 2 points) of `chance_accuracy`."""
    if accuracy is None or not len(labels):
        return False
    chance = chance_accuracy(labels)
    margin = max(0.02, 2.0 * math.sqrt(chance * (1.0 - chance) / len(labels)))
    return accuracy <= chance + margin


class CollapseMonitor:
    """Watches one fit; `epoch_end` returns the warning once, when the run looks collapsed."""

    def __init__(self, num_classes: int | None, train_labels: np.ndarray, eval_labels: np.ndarray | None,
                 initial_eval_accuracy: float | None, causes: Callable[[], Sequence[str]]) -> None:
        self.num_classes = num_classes
        self.train_labels = train_labels
        self.eval_labels = eval_labels
        self.initial_eval_accuracy = initial_eval_accuracy
        self.causes = causes
        self.messages: list[str] = []
        self.train_losses: list[float] = []

    def epoch_end(self, epoch: int, train_loss: float, train_accuracy: float | None, eval_accuracy: float | None,
                  train_constant: bool, eval_constant: bool) -> str | None:
        """`epoch` counts from 1. The message, the first time symptoms show; None otherwise."""
        if self.messages or self.num_classes is None or self.num_classes < 2:
            return None
        symptoms = self._symptoms(epoch, train_loss, train_accuracy, eval_accuracy, train_constant, eval_constant)
        if not symptoms:
            return None
        causes = list(self.causes())
        self.messages.append(f"training looks collapsed at epoch {epoch}: {'; '.join(symptoms)}. Likely causes: "
                             + "; ".join(f"({i}) {cause}" for i, cause in enumerate(causes, 1)))
        return self.messages[-1]

    def _symptoms(self, epoch: int, train_loss: float, train_accuracy: float | None, eval_accuracy: float | None,
                  train_constant: bool, eval_constant: bool) -> list[str]:
        classes = self.num_classes or 2
        chance_train = chance_accuracy(self.train_labels)
        self.train_losses.append(train_loss)
        first = self.train_losses[0]
        log_classes = math.log(classes)
        seen = len(self.train_losses)  # epochs this run watched (a resumed run starts late)
        stuck = (seen >= 3 and first - train_loss < LOG_CLASSES_TOLERANCE * log_classes
                 and all(abs(loss - log_classes) <= LOG_CLASSES_TOLERANCE * log_classes for loss in self.train_losses[-2:]))
        symptoms = []
        if train_constant or eval_constant:
            where = " and ".join(w for w, flag in (("training", train_constant), ("evaluation", eval_constant)) if flag)
            symptoms.append(f"the outputs are the same for every {where} sample (the features no longer depend on the input)")
        train_at_chance = at_chance(train_accuracy, self.train_labels)
        if train_at_chance and stuck:
            symptoms.append(f"the training loss is stuck at ln({classes}) = {log_classes:.3f} "
                            f"(uniform predictions) with accuracy {train_accuracy:.3f} at chance")
        elif seen >= 3 and train_at_chance and train_loss >= 0.98 * first:
            symptoms.append(f"training accuracy is {train_accuracy:.3f} after {seen} epochs, at chance "
                            f"({chance_train:.3f}), and the training loss has not fallen ({first:.3f} "
                            f"-> {train_loss:.3f}): the model does not learn even the training data")
        if self.eval_labels is not None and at_chance(eval_accuracy, self.eval_labels):
            chance_eval = chance_accuracy(self.eval_labels)
            was_better = self.initial_eval_accuracy is not None and not at_chance(self.initial_eval_accuracy, self.eval_labels)
            learned = train_accuracy is not None and train_accuracy >= max(chance_train, eval_accuracy or 0.0) + 0.25
            if was_better:
                symptoms.append(f"evaluation accuracy fell to {eval_accuracy:.3f}, chance ({chance_eval:.3f}), from "
                                f"{self.initial_eval_accuracy:.3f} before training")
            elif learned:
                symptoms.append(f"evaluation accuracy is {eval_accuracy:.3f}, chance ({chance_eval:.3f}), while training "
                                f"accuracy is {train_accuracy:.3f}")
        return symptoms


def likely_causes(recipe: Mapping[str, Any], report: Mapping[str, Any], lr: float,
                  batch_norm_in_batch_mode: Callable[[], bool]) -> list[str]:
    """What in this artifact folder usually causes a collapse, most specific first."""
    causes = []
    passes = {entry["name"]: entry for entry in report.get("passes", [])}
    options = {p["name"]: p.get("options", {}) for p in recipe.get("passes", [])}
    if batch_norm_in_batch_mode():
        causes.append("BatchNormalization runs on batch statistics while training but on running statistics in "
                      "evaluation and export: add the 'freeze-bn' pass ({layers: all} keeps every BN in inference mode)")
    head = options.get("new-head")
    if "new-head" not in passes:
        causes.append("the model's own classifier is trained for other classes, or a random head: replace it with the "
                      "'new-head' pass (init prototypes, with --calibration-data support.npz) at the top of the recipe")
    elif head is not None and head.get("init") in ("random", "zeros"):
        causes.append(f"the new head starts {head.get('init')}: its first large gradients wreck pretrained features; use "
                      "init prototypes or linear-probe")
    parameters = report.get("parameters", {})
    share = parameters.get("trainable_values", 0) / max(parameters.get("total_values", 1), 1)
    if lr >= 1e-3 and share > 0.2:
        causes.append(f"the learning rate {lr:g} is high for fine-tuning a pretrained backbone: try --lr 1e-4, or train "
                      "the last layer only ('trainable' pass, layers: classifier)")
    elif share > 0.2:
        causes.append(f"the learning rate {lr:g} may still be too high for training {share:.0%} of the weights of this "
                      f"model: try --lr {lr / 10:g}, or train fewer layers")
    elif lr >= 0.05:
        causes.append(f"the learning rate {lr:g} is high: try a tenth of it")
    if report.get("stages"):
        causes.append("local learning (lls) trains each block on its own loss: blocks of a pretrained model lose what "
                      "the next block expects; train it from scratch or use it on the last blocks only")
    causes.append("the data: labels that do not match the inputs, or classes the features cannot tell apart")
    return causes
