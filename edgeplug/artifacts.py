"""Reading an artifact folder on the device: its report and the folders that train.

Imported by the trainer, the exporter, the profiler and fleet clients; it needs
neither the rewrite stack nor jsonschema nor yaml, so a device that only trains
loads none of them. File names are in `edgeplug.layout`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from edgeplug.errors import EdgeplugError
from edgeplug.layout import FORWARD_MODEL, RECIPE_FILE, REPORT_FILE, STAGES_DIR


def read_report(artifact_dir: Path) -> dict[str, Any]:
    """Read out/report.json, with a clear error if the folder is not an artifact folder."""
    path = Path(artifact_dir) / REPORT_FILE
    if not path.is_file():
        raise EdgeplugError(f"{artifact_dir} is not an edgeplug artifact folder (no {REPORT_FILE}); run 'edgeplug rewrite' first")
    try:
        report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # a folder copied onto a full disk, a hand edit
        raise EdgeplugError(f"{path} is damaged ({type(error).__name__}); rewrite the artifact folder") from None
    if not isinstance(report, dict) or not isinstance(report.get("training"), dict):
        raise EdgeplugError(f"{path} is not an edgeplug report (no 'training' section); rewrite the artifact folder")
    return report


def read_recipe_training(artifact_dir: Path) -> dict[str, Any]:
    """The `training` section (epochs, batch_size, seed) of the folder's recipe.json; {} when there is none or the
    file cannot be read (the trainer then says what is wrong with the folder)."""
    try:
        recipe = json.loads((Path(artifact_dir) / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    training = recipe.get("training") if isinstance(recipe, dict) else None
    return {key: value for key, value in training.items() if isinstance(value, int) and not isinstance(value, bool)} \
        if isinstance(training, dict) else {}


def is_artifact_folder(path: Path) -> bool:
    """A folder `edgeplug rewrite` wrote: its report.json is a JSON object naming the edgeplug version."""
    report = Path(path) / REPORT_FILE
    try:
        if not Path(path).is_dir() or not report.is_file() or report.stat().st_size > 2**26:
            return False
        document = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "edgeplug_version" in document and "training" in document


def stage_folders(artifact_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """The folders that train, in order: the stages of a staged folder, else the folder itself."""
    stages = report.get("stages")
    if not stages:
        return [Path(artifact_dir)]
    folders = []
    for entry in stages:
        folder = Path(artifact_dir) / entry["dir"]
        if not folder.resolve().is_relative_to(Path(artifact_dir).resolve()) or not entry["dir"].startswith(STAGES_DIR + "/"):
            raise EdgeplugError(f"{artifact_dir}/{REPORT_FILE} names a stage folder outside {STAGES_DIR}/: {entry['dir']}")
        folders.append(folder)
    return folders


def output_shape(artifact_dir: Path, report: Mapping[str, Any]) -> list[int | str | None]:
    """The trained output's shape, from report.json (or the forward model, for older folders)."""
    recorded: list[int | str | None] | None = report["training"].get("output_shape")
    if recorded is not None:
        return recorded
    model = onnx.load(str(Path(artifact_dir) / FORWARD_MODEL), load_external_data=False)
    output = next(v for v in model.graph.output if v.name == report["training"]["output"])
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in output.type.tensor_type.shape.dim]
