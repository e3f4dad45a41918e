"""write_checkpoint(replace_all=True): the old checkpoints stay until the new one is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeplug.checkpoints import latest_checkpoint, write_checkpoint


def _state(path: Path) -> None:
    path.write_bytes(b"state")


def test_replace_all_swaps_in_one_checkpoint_and_keeps_the_old_ones_on_failure(tmp_path: Path) -> None:
    for step in (5, 9):
        write_checkpoint(tmp_path, step, {"step": step}, _state, lambda path: None)

    def broken(path: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 0, {"step": 0}, broken, lambda path: None, replace_all=True)
    assert latest_checkpoint(tmp_path).name == "step-00000009"
    write_checkpoint(tmp_path, 0, {"step": 0}, _state, lambda path: None, replace_all=True)
    assert latest_checkpoint(tmp_path).name == "step-00000000"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step-00000000"]
