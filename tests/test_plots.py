"""`edgeplug train --plot`: curves written after training, and refused before any work without matplotlib."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp

from edgeplug import cli
from edgeplug.plugins import reset_default_host

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    onnx.save(mlp(8, (16,), 3), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", **classification_data([8], 3, n=32))
    reset_default_host()
    assert cli.main(["rewrite", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "-q"]) == 0
    return tmp_path


def test_train_plot_writes_the_curves_also_for_a_resumed_run(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    data = str(folder / "d.npz")
    arguments = ["train", str(folder / "out"), "--data", data, "--eval", data, "--batch-size", "8"]
    assert cli.main([*arguments, "--epochs", "2", "--plot", str(folder / "a.png")]) == 0
    assert cli.main([*arguments, "--epochs", "3", "--plot", str(folder / "b.png"), "--json"]) == 0
    for name in ("a.png", "b.png"):
        assert (folder / name).read_bytes()[:8] == PNG
    assert "wrote" in capsys.readouterr().err  # under --json the info line goes to stderr


def test_train_plot_is_refused_before_training_without_matplotlib(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = cli.main(["train", str(folder / "out"), "--data", str(folder / "d.npz"), "--plot", str(folder / "a.png")])
    assert code == 2 and "pip install 'edgeplug[plot]'" in capsys.readouterr().err
    assert not (folder / "out" / "checkpoints").exists() and not (folder / "a.png").exists()
