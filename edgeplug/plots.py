"""Training curves as a PNG (`edgeplug train --plot`): loss and accuracy per epoch, and the loss of every step.

matplotlib is optional (the `plot` extra); the CLI checks for it before any work starts
(`edgeplug.cli.require_matplotlib`). Accuracy axes always span 0..1, so two results near chance
never look far apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeplug.atomic import atomic_file
from edgeplug.errors import SetupError


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), or a SetupError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SetupError("plots need matplotlib: pip install 'edgeplug[plot]'") from None
    return plt


def plot_training(result: Any, target: Path, *, title: str = "") -> None:
    """A `FitResult` as curves: the loss of every step this run ran (by global step); training and evaluation loss
    per epoch (evaluation before training at epoch 0); training and evaluation accuracy per epoch (cross-entropy)."""
    plt = pyplot()
    epochs = [entry.epoch for entry in result.epochs]
    evaluated = ([(0, result.initial_eval)] if result.initial_eval is not None else []) + \
        [(entry.epoch, entry.eval) for entry in result.epochs if entry.eval is not None]
    accuracy = any(entry.train.accuracy is not None for entry in result.epochs)
    panels = 3 if accuracy else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6))
    first = (result.resumed_from_step or 0) + 1
    axes[0].plot(range(first, first + len(result.step_losses)), result.step_losses, color="#4c72b0", linewidth=0.9)
    axes[0].set_xlabel("step" + (f" (this run: from {first})" if result.resumed_from_step else ""))
    axes[0].set_ylabel("training loss")
    axes[0].set_title("every step")
    axes[1].plot(epochs, [entry.train.loss for entry in result.epochs], "o-", color="#4c72b0", label="training (epoch mean)")
    if evaluated:
        axes[1].plot([e for e, _ in evaluated], [m.loss for _, m in evaluated], "s-", color="#c44e52", label="evaluation")
    axes[1].set_ylabel("loss")
    axes[1].set_title("loss per epoch")
    if accuracy:
        axes[2].plot(epochs, [entry.train.accuracy for entry in result.epochs], "o-", color="#4c72b0", label="training")
        scored = [(e, m.accuracy) for e, m in evaluated if m.accuracy is not None]
        if scored:
            axes[2].plot([e for e, _ in scored], [a for _, a in scored], "s-", color="#c44e52", label="evaluation")
        axes[2].set_ylim(0, 1.02)  # the whole range: results near chance must not look far apart
        axes[2].set_ylabel("accuracy")
        axes[2].set_title("accuracy per epoch")
    for axis in axes[1:]:
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_file(Path(target)) as staging:
        figure.savefig(staging, format="png", dpi=120)
    plt.close(figure)
