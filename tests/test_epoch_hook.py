"""The public epoch-end hook (for experiment trackers), and `edgeplug.testing` without pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from builders import classification_data, mlp

from edgeplug import cli, hookimpl
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost, default_host, reset_default_host
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import EpochResult, Trainer


class Tracker:
    """What an MLflow or TensorBoard plugin does: record every epoch's metrics."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, float, float | None, Path]] = []

    @hookimpl
    def edgeplug_epoch_end(self, epoch: EpochResult, epochs: int, step: int, artifact_dir: Path) -> None:
        self.seen.append((epoch.epoch, epochs, step, epoch.train.loss, epoch.eval.accuracy if epoch.eval else None, artifact_dir))


@pytest.mark.covers_hook("edgeplug_epoch_end")
def test_a_tracker_sees_every_epoch_once_with_its_metrics(tmp_path: Path) -> None:
    host = PluginHost()
    tracker = Tracker()
    host.register(tracker, name="tracker")
    folder = tmp_path / "out"
    rewrite(mlp(8, (16,), 3), recipe_from_dict({}, host=host), folder, host=host)
    data = classification_data([8], 3, n=48)
    result = Trainer(folder, host=host, progress=False).fit(data, data, epochs=2, batch_size=16)
    assert [row[:3] for row in tracker.seen] == [(1, 2, 3), (2, 2, 6)]
    assert [row[3] for row in tracker.seen] == [epoch.train.loss for epoch in result.epochs]
    assert all(row[4] is not None and row[5] == folder for row in tracker.seen)
    Trainer(folder, host=host, progress=False).fit(data, epochs=3, batch_size=16)  # resumed: only the new epoch
    assert [row[:3] for row in tracker.seen][2:] == [(3, 3, 9)]


def test_a_tracker_plugin_sees_cli_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(mlp(8, (16,), 3), str(model))
    data = tmp_path / "d.npz"
    np.savez(data, **classification_data([8], 3, n=32))
    reset_default_host()
    try:
        tracker = Tracker()
        default_host().register(tracker, name="tracker")
        assert cli.main(["rewrite", str(model), "-o", str(tmp_path / "out"), "-q"]) == 0
        assert cli.main(["train", str(tmp_path / "out"), "--data", str(data), "--epochs", "2", "-q"]) == 0
        assert [row[0] for row in tracker.seen] == [1, 2]
    finally:
        reset_default_host()
    capsys.readouterr()


def test_edgeplug_testing_works_without_pytest(tmp_path: Path) -> None:
    """pytest is not a dependency: the helpers import and run with pytest unimportable."""
    code = ("import sys; sys.modules['pytest'] = None\n"
            "sys.path.insert(0, 'tests')\n"
            "from builders import mlp\n"
            "from edgeplug.testing import host_with, rewrite_with\n"
            f"result = rewrite_with(mlp(8, (16,), 3), {{}}, {str(tmp_path / 'out')!r})\n"
            "import edgeplug.testing as t; print(hasattr(t, 'edgeplug_host'), sorted(host_with().passes())[:1])")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "False"
    assert (tmp_path / "out" / "report.json").is_file()


def test_the_pytest_fixture_is_there_under_pytest(edgeplug_host: Any) -> None:
    assert "trainable" in edgeplug_host.passes()


pytest_plugins = ["edgeplug.testing"]
