"""Training that ends at chance is noticed and explained; evaluation keeps to the training batch size and memory cap."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn, mlp

import edgeplug
from edgeplug.collapse import CollapseMonitor, OutputSpread, at_chance, likely_causes
from edgeplug.guard import current_rss_bytes
from edgeplug.profiling.static import static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import StepInfo, Trainer

BALANCED = np.arange(100) % 4  # chance 0.25


def monitor(initial: float | None = None, eval_labels: np.ndarray | None = BALANCED) -> CollapseMonitor:
    return CollapseMonitor(4, BALANCED, eval_labels, initial, lambda: ["cause one", "cause two"])


# -- the rules -------------------------------------------------------------------------------


def test_loss_stuck_at_ln_classes_with_chance_accuracy_warns_once_with_the_causes() -> None:
    watch = monitor()
    assert watch.epoch_end(1, math.log(4), 0.25, None, False, False) is None  # too early to tell
    assert watch.epoch_end(2, math.log(4), 0.25, None, False, False) is None
    message = watch.epoch_end(3, math.log(4) + 0.001, 0.26, None, False, False)
    assert message is not None and "stuck at ln(4) = 1.386" in message and "(1) cause one; (2) cause two" in message
    assert watch.epoch_end(4, math.log(4), 0.25, None, False, False) is None  # once
    assert watch.messages == [message]


def test_constant_outputs_warn_at_once() -> None:
    message = monitor().epoch_end(1, 0.9, 0.6, 0.6, True, False)
    assert message is not None and "same for every training sample" in message


def test_evaluation_falling_to_chance_or_far_below_training_warns() -> None:
    fell = monitor(initial=0.7).epoch_end(1, 0.5, 0.8, 0.24, False, False)
    assert fell is not None and "fell to 0.240, chance (0.250), from 0.700" in fell
    mismatch = monitor(initial=0.25).epoch_end(1, 0.3, 0.9, 0.25, False, False)  # batch-mode BN: train fine, eval chance
    assert mismatch is not None and "while training accuracy is 0.900" in mismatch


def test_healthy_or_merely_hard_runs_do_not_warn() -> None:
    watch = monitor(initial=0.3)
    for epoch, (loss, train, evaluation) in enumerate([(1.3, 0.35, 0.33), (1.0, 0.55, 0.5), (0.7, 0.75, 0.7)], 1):
        assert watch.epoch_end(epoch, loss, train, evaluation, False, False) is None
    # learning slowly but above chance, with a loss near ln(4): not stuck
    slow = monitor()
    assert all(slow.epoch_end(e, math.log(4), 0.45, None, False, False) is None for e in (1, 2, 3))
    # a fresh model starts at ln(4) and moves away, slowly: not stuck
    fresh = monitor()
    assert all(fresh.epoch_end(e, math.log(4) - 0.02 * e, 0.25, None, False, False) is None for e in (1, 2, 3, 4))
    # regression losses have no classes
    assert CollapseMonitor(None, BALANCED, None, None, lambda: []).epoch_end(5, 0.0, None, None, True, True) is None


def test_chance_follows_the_label_frequencies_and_the_sample_size() -> None:
    skewed = np.array([0] * 90 + [1] * 10)
    assert at_chance(0.9, skewed) and not at_chance(0.99, skewed)
    assert at_chance(0.6, np.array([0, 1] * 5))  # 10 samples: within two standard errors of 0.5
    spread = OutputSpread()
    spread.add(np.ones((4, 3)))
    spread.add(np.ones((2, 3)) + 1e-7)
    assert spread.constant()
    spread.add(np.eye(3))
    assert not spread.constant()


def test_causes_name_what_this_folder_does() -> None:
    report: dict[str, Any] = {"passes": [{"name": "normalize"}], "parameters": {"trainable_values": 90, "total_values": 100}}
    causes = likely_causes({"passes": []}, report, 1e-3, lambda: True)
    assert "freeze-bn" in causes[0] and "'new-head' pass" in causes[1] and "--lr 1e-4" in causes[2]
    report["passes"].append({"name": "new-head"})
    recipe = {"passes": [{"name": "new-head", "options": {"init": "random"}}]}
    causes = likely_causes(recipe, report | {"parameters": {"trainable_values": 1, "total_values": 100}}, 1e-3, lambda: False)
    assert "starts random" in causes[0] and not any("freeze-bn" in c or "--lr" in c for c in causes)


# -- end to end ------------------------------------------------------------------------------


def test_cli_warns_once_on_stderr_when_a_zero_head_never_moves(tmp_path: Path) -> None:
    onnx.save(mlp(8, (16,), 3), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", **classification_data((8,), 4, n=40))
    (tmp_path / "r.yaml").write_text("optimizer: {name: sgd, lr: 1.0e-9}\npasses:\n"
                                     "  - {name: new-head, options: {init: zeros}}\n  - {name: trainable, options: {layers: classifier}}\n")
    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeplug.cli", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)

    assert cli("rewrite", tmp_path / "m.onnx", "--recipe", tmp_path / "r.yaml", "--calibration-data", tmp_path / "d.npz",
               "-o", tmp_path / "out").returncode == 0
    result = cli("train", tmp_path / "out", "--data", tmp_path / "d.npz", "--eval", tmp_path / "d.npz", "--epochs", "4",
                 "--batch-size", "8", "--no-progress")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("edgeplug: warning: training looks collapsed")]
    assert len(warnings) == 1, result.stderr
    assert "same for every training and evaluation sample" in warnings[0] and "new head starts zeros" in warnings[0]


def test_python_api_warns_with_a_training_warning_and_records_it(tmp_path: Path) -> None:
    model = mlp(8, (16,), 3)
    data = classification_data((8,), 3, n=24)
    recipe = recipe_from_dict({"optimizer": {"name": "sgd", "lr": 1e-9},
                               "passes": [{"name": "new-head", "options": {"init": "zeros", "classes": 3}}]})
    edgeplug.rewrite(model, recipe, tmp_path / "out")
    with pytest.warns(edgeplug.TrainingWarning, match="training looks collapsed at epoch 1"):
        result = Trainer(tmp_path / "out", progress=False).fit(data, epochs=2, batch_size=8)
    assert len(result.warnings) == 1


def test_a_working_run_does_not_warn(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    data = classification_data((8,), 3, n=48)
    edgeplug.rewrite(mlp(8, (16,), 3), None, tmp_path / "out")
    result = Trainer(tmp_path / "out", progress=False, lr=0.01).fit(data, data, epochs=4, batch_size=8)
    assert result.epochs[-1].eval.accuracy > 0.8
    assert result.warnings == [] and not [w for w in recwarn if issubclass(w.category, edgeplug.TrainingWarning)]


# -- evaluation: the training batch size, under the memory cap ---------------------------------


class EvalBatches:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @edgeplug.hookimpl
    def edgeplug_before_step(self, step: StepInfo) -> None:
        if not step.training:
            self.sizes.append(len(step.batch["labels"]))


def test_evaluation_runs_at_the_training_batch_size(tmp_path: Path) -> None:
    edgeplug.rewrite(mlp(8, (16,), 3), None, tmp_path / "out")
    train, evaluation = classification_data((8,), 3, n=16), classification_data((8,), 3, n=300, seed=1)
    host = edgeplug.PluginHost(only={"normalize"})
    probe = EvalBatches()
    host.register(probe, name="probe", version="test")
    trainer = Trainer(tmp_path / "out", progress=False, host=host)
    trainer.fit(train, evaluation, epochs=1, batch_size=8)
    assert probe.sizes and max(probe.sizes) == 8 and sum(probe.sizes) == 600  # before training and after the epoch
    probe.sizes.clear()
    trainer.evaluate(evaluation)  # the last fit's batch size
    assert max(probe.sizes) == 8
    probe.sizes.clear()
    trainer.evaluate(evaluation, batch_size=100)
    assert probe.sizes == [100, 100, 100]


def test_standalone_evaluation_refuses_a_batch_that_does_not_fit_the_memory_cap(tmp_path: Path) -> None:
    edgeplug.rewrite(cnn((8, 16), 10, image=64, batch_norm=False), None, tmp_path / "out")
    data = classification_data((1, 64, 64), 10, n=64)
    at_8, at_64 = (static_profile(tmp_path / "out", b).total_training_bytes for b in (8, 64))
    budget = current_rss_bytes() + (at_8 + at_64) // 2
    trainer = Trainer(tmp_path / "out", progress=False, max_memory=budget)
    with pytest.raises(edgeplug.ResourceError, match="batch size 64 .*evaluate with a smaller batch size"):
        trainer.evaluate(data, batch_size=64)
    assert trainer.evaluate(data, batch_size=8).accuracy is not None


def test_training_at_chance_whose_loss_does_not_fall_warns_but_slow_learning_does_not() -> None:
    stuck = monitor()
    for epoch in (1, 2):
        assert stuck.epoch_end(epoch, 2.0, 0.2, None, False, False) is None
    message = stuck.epoch_end(3, 2.01, 0.2, None, False, False)
    assert message is not None and "has not fallen (2.000 -> 2.010)" in message
    slow = monitor()
    for epoch, loss in enumerate((2.0, 1.9, 1.8, 1.7), 1):
        assert slow.epoch_end(epoch, loss, 0.2, None, False, False) is None


def test_a_resumed_run_judges_only_the_epochs_it_watched() -> None:
    resumed = monitor()
    assert resumed.epoch_end(7, 2.0, 0.2, None, False, False) is None  # epoch 7 of a resumed run: one epoch seen
    assert resumed.epoch_end(8, 2.0, 0.2, None, False, False) is None
