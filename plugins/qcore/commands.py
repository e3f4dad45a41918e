"""CLI commands: `edgeplug quantize` (offline), `edgeplug calibrate` (the device loop), `edgeplug export-quantized`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from edgeplug.plugin_api import CommandRegistry, DataError, Dataset, Progress, TensorSpec, load_dataset, print_result

QCORE_DIR = "qcore"
QUANTIZE_BATCH_SIZE = 32
"""The float model's batch size, as `edgeplug train`'s."""

log = logging.getLogger("edgeplug.plugins.qcore")


def register(commands: CommandRegistry) -> None:
    quantize = commands.add_parser("quantize", help="qcore: train the float model with forgetting records, quantize, draw the coreset, train the bit-flip networks")
    quantize.add_argument("artifacts", type=Path, help="artifact folder rewritten with the 'qcore' pass")
    quantize.add_argument("--data", type=Path, required=True, help="training .npz (x, y)")
    quantize.add_argument("--epochs", type=int, default=10, help="float training epochs (total target; records every record_every epochs)")
    quantize.add_argument("--batch-size", type=int, default=QUANTIZE_BATCH_SIZE, metavar="N", help="batch size of the float training (train's default)")
    quantize.add_argument("--drift-data", type=Path, help="labelled examples grouped by domain (.npz: x, y, domain) the flip "
                          "networks learn from, e.g. people the float model is not trained on; default: synthetic drifts")
    quantize.add_argument("--reuse-records", action="store_true", help="keep the trained float model and forgetting records of "
                          "an earlier run in OUT/qcore/ and redo only quantization, coreset and flip networks (e.g. after "
                          "changing bits or flip options)")
    quantize.set_defaults(run=run_quantize)
    calibrate = commands.add_parser("calibrate", help="qcore: recalibrate the quantized model on a stream of chunks, forward passes only")
    calibrate.add_argument("artifacts", type=Path, help="artifact folder after 'edgeplug quantize'")
    calibrate.add_argument("--stream", type=Path, nargs="+", required=True, help="chunk .npz files (x, y), in stream order")
    calibrate.set_defaults(run=run_calibrate)
    exporter = commands.add_parser("export-quantized", help="qcore: write the quantized model with its current (recalibrated) weights")
    exporter.add_argument("artifacts", type=Path, help="artifact folder after 'edgeplug quantize' (and 'edgeplug calibrate')")
    exporter.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    exporter.add_argument("--initial", action="store_true", help="the codes 'edgeplug quantize' wrote, before any calibration")
    exporter.set_defaults(run=run_export)


def run_quantize(args: argparse.Namespace) -> int:
    from .build import build, rebuild

    if args.epochs < 1 or args.batch_size < 1:
        raise DataError("--epochs and --batch-size must be at least 1")
    drift = _drift_data(args.drift_data, _input_names(args.artifacts)) if args.drift_data else None
    with Progress("quantize", unit="stage") as bar:  # records, coreset, flip targets, flip networks: one item each

        def echo(text: str) -> None:
            log.info("%s", text)
            bar.advance(status=text.split(":")[0][:48])

        if args.reuse_records:
            summary = rebuild(args.artifacts, args.data, echo=echo, drift_data=drift)
        else:
            summary = build(args.artifacts, args.data, epochs=args.epochs, batch_size=args.batch_size, echo=echo, drift_data=drift)
    folder = args.artifacts / QCORE_DIR
    ratio = summary["quantized_bytes"] / summary["float_bytes"]
    return print_result({"output": str(folder), **summary},
                        f"wrote {folder}/: model.int{summary['bits']}.onnx {summary['quantized_bytes']} bytes "
                        f"({ratio:.1%} of the float model's {summary['float_bytes']}), coreset {summary['coreset_size']} of "
                        f"{summary['examples']} examples ({summary['coreset_share']:.2%}), {len(summary['flipnets'])} flip networks")


def _input_names(artifacts: Path) -> list[str]:
    """The model's data inputs, in order, from the folder's report (empty when there is none: the build says so)."""
    report = artifacts / "report.json"
    if not report.is_file():
        return []
    return [i["name"] for i in json.loads(report.read_text(encoding="utf-8"))["training"]["inputs"]]


def _drift_data(path: Path, input_names: list[str]) -> Any:
    """--drift-data: x (or, for a model with several inputs, one array per input name), y and an integer domain per
    example, checked before any training."""
    import numpy as np

    from .build import DriftData
    from .examples import Examples

    if not path.is_file():
        raise DataError(f"--drift-data {path}: no such file")
    several = len(input_names) > 1
    keys = input_names if several else ["x"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (*keys, "y", "domain") if k not in archive.files]
            if missing:
                raise DataError(f"--drift-data {path}: missing arrays {missing} (needs {', '.join(keys)}, y and domain)")
            arrays, y, domain = {k: archive[k] for k in keys}, archive["y"], archive["domain"]
    except (OSError, ValueError) as error:
        raise DataError(f"--drift-data {path}: not a readable .npz ({error})") from None
    lengths = {len(v) for v in arrays.values()}
    if lengths != {len(y)} or len(domain) != len(y) or len(y) == 0:
        raise DataError(f"--drift-data {path}: {', '.join(keys)}, y and domain must have the same non-zero length "
                        f"({', '.join(str(len(v)) for v in arrays.values())}, {len(y)}, {len(domain)})")
    if not np.issubdtype(y.dtype, np.integer) or not np.issubdtype(domain.dtype, np.integer) or y.ndim != 1 or domain.ndim != 1:
        raise DataError(f"--drift-data {path}: y and domain must be 1-D integer arrays")
    x: Any = Examples(arrays) if several else arrays["x"].astype(np.float32)
    return DriftData(x, y.astype(np.int64), domain.astype(np.int64))


def _chunks(artifacts: Path, paths: list[Path]) -> list[Dataset]:
    """Every chunk loaded and checked against the model's input before any calibration runs."""
    report_path, recipe_path = artifacts / "report.json", artifacts / "recipe.json"
    if not report_path.is_file():
        raise DataError(f"{artifacts} is not an edgeplug artifact folder (no report.json); run 'edgeplug rewrite' first")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    specs = [TensorSpec(i["name"], i["dtype"], i["shape"]) for i in report["training"]["inputs"]]
    data = recipe.get("data", {})
    shape = report["training"].get("output_shape") or []
    classes = shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
    return [load_dataset(path, specs, loss="cross-entropy", num_classes=classes,
                         input_keys=data.get("inputs"), labels_key=data.get("labels")) for path in paths]


def run_calibrate(args: argparse.Namespace) -> int:
    from .build import read_options
    from .calibrate import Calibrator
    from .examples import of as examples_of
    from .export import export_quantized

    options = read_options(args.artifacts)
    calibrator = Calibrator(args.artifacts / QCORE_DIR, options)
    chunks = _chunks(args.artifacts, args.stream)
    rows: list[dict[str, Any]] = []
    with Progress("calibrate", total=len(chunks), unit="chunk") as bar:
        # chunks keep counting across calls: coreset examples from an earlier call are old, not this chunk's
        first = int(calibrator.coreset.origin.max()) + 1
        for number, (path, chunk) in enumerate(zip(args.stream, chunks), start=first):
            bar.status(path.name)
            result = calibrator.step(examples_of(chunk.inputs), chunk.labels, number, path.name)
            calibrator.save()
            rows.append(dataclasses.asdict(result))
            bar.advance(status=f"acc {result.accuracy_after:.3f}")
    # the folder's quantized model follows the recalibrated state
    refreshed = export_quantized(args.artifacts, args.artifacts / QCORE_DIR / f"model.int{calibrator.state.bits}.onnx")

    def text() -> str:
        lines = [f"{'chunk':>5}  {'file':<24} {'n':>5}  {'acc before':>10}  {'acc after':>9}  {'flips':>6}  {'kept':>5}  {'coreset new':>11}  {'s':>6}"]
        lines += [f"{row['chunk']:>5}  {row['source'][:24]:<24} {row['examples']:>5}  {row['accuracy_before']:>10.3f}  "
                  f"{row['accuracy_after']:>9.3f}  {row['flips_proposed']:>6}  {row['flips_kept']:>5}  {row['coreset_from_stream']:>11}  "
                  f"{row['seconds']:>6.2f}" for row in rows]
        return "\n".join(lines)

    status = print_result(rows, text)
    log.info("updated %s (recalibrated); 'edgeplug export-quantized %s -o FILE' writes it elsewhere", refreshed, args.artifacts)
    return status


def run_export(args: argparse.Namespace) -> int:
    from .export import export_quantized

    path = export_quantized(args.artifacts, args.output, initial=args.initial)
    size = path.stat().st_size
    return print_result({"output": str(path), "bytes": size, "initial": args.initial},
                        f"wrote {path} ({size / 1e6:.2f} MB, quantized{' (as quantized, before calibration)' if args.initial else ''})")
