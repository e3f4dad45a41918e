"""The `edgeplug` command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from edgeplug import __version__
from edgeplug.errors import DiskFullError, EdgeplugError, disk_full_detail, is_disk_full
from edgeplug.terminal import EscapingWriter, escape

INTERNAL_ERROR = 1
INTERRUPTED = 130


def _passes(args: argparse.Namespace) -> int:
    from edgeplug.plugins import default_host

    passes = sorted(default_host().passes().values(), key=lambda p: p.name)
    if args.json:
        print(json.dumps([{"name": p.name, "plugin": p.plugin, "version": p.version, "summary": p.summary} for p in passes], indent=2))
        return 0
    rows = [("PASS", "PLUGIN", "VERSION", "SUMMARY")] + [(p.name, escape(p.plugin), escape(p.version), escape(p.summary)) for p in passes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from edgeplug.inspection import format_inspection, inspect_model

    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _rewrite(args: argparse.Namespace) -> int:
    from edgeplug.data import load_npz
    from edgeplug.pipeline import rewrite

    calibration = load_npz(args.calibration_data) if args.calibration_data else None
    result = rewrite(args.model, args.recipe, args.output, force=args.force, calibration=calibration,
                     max_memory=args.max_memory, pass_timeout=args.pass_timeout,
                     ort_format=args.ort_format, nominal_checkpoint=args.nominal_checkpoint)
    report = result.report
    for entry in report["passes"]:
        print(f"{entry['name']:<14} {escape(entry['summary'])}")
    params = report["parameters"]
    print(f"wrote {escape(result.output_dir)}/: {params['trainable_count']} trainable parameter tensors "
          f"({params['trainable_values']:,} of {params['total_values']:,} weight values after the passes), loss {report['training']['loss']} "
          f"on '{escape(report['training']['output'])}'")
    print(_size_line(report["artifacts"]))
    return 0


def _size_line(artifacts: dict[str, int]) -> str:
    """One line of report.json's file sizes: what a device app would ship."""
    from edgeplug.layout import (
        CHECKPOINT,
        EVAL_MODEL,
        NOMINAL_CHECKPOINT,
        OPTIMIZER_MODEL,
        ORT_MODELS,
        TRAINING_MODEL,
    )

    def size(count: int) -> str:
        return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"

    def total(name: str) -> int:
        """A file's bytes, summed over stages in a staged folder (stages/<i>/<name>)."""
        return sum(count for key, count in artifacts.items() if key == name or (key.startswith("stages/") and key.rsplit("/", 1)[-1] == name))

    def present(name: str) -> bool:
        return any(key == name or key.endswith("/" + name) for key in artifacts)

    models = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)
    parts = ["training/eval/optimizer .onnx " + " / ".join(size(total(name)) for name in models)]
    if all(present(ORT_MODELS[name]) for name in models):
        parts.append(".ort " + " / ".join(size(total(ORT_MODELS[name])) for name in models))
    parts.append(f"checkpoint {size(total(CHECKPOINT))}")
    if present(NOMINAL_CHECKPOINT):
        parts.append(f"nominal checkpoint {size(total(NOMINAL_CHECKPOINT))}")
    return "sizes: " + ", ".join(parts)


def _train(args: argparse.Namespace) -> int:
    from edgeplug.trainer import Trainer

    if args.runtime == "node":
        from edgeplug.node_runtime import train_with_node

        return train_with_node(args)
    if args.threads is not None:
        raise EdgeplugError("--threads applies to --runtime node; the Python runtime uses onnxruntime's default")
    trainer = Trainer(
        args.artifacts, seed=args.seed, lr=args.lr, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, echo=print, checkpoints=not args.no_checkpoints, max_memory=args.max_memory,
        cache_prefix=args.cache_prefix, cache_memory=args.cache_memory,
        warn=lambda text: print(f"edgeplug: warning: {_one_line(text)}", file=sys.stderr),
    )
    result = trainer.fit(args.data, args.eval, epochs=args.epochs, batch_size=args.batch_size, resume=not args.restart)
    if result.steps_run == 0:
        print(f"nothing to do: the latest checkpoint already covers {args.epochs} epochs (use --epochs to train longer or --restart)")
    step = f"{result.median_step_seconds * 1000:.1f} ms" if result.median_step_seconds is not None else "-"
    print(f"done: {result.steps_run} steps, median step {step}, peak memory {result.peak_rss_bytes / 2**20:.0f} MiB")
    if args.metrics:
        from edgeplug.atomic import write_text

        write_text(Path(args.metrics), json.dumps(_fit_json(result), indent=2) + "\n")
    return 0


def _pack_data(args: argparse.Namespace) -> int:
    from edgeplug.node_runtime import pack_data

    path, count = pack_data(args.artifacts, args.data, args.output)
    print(f"wrote {path}: {count} samples ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _fit_json(result: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(result)


def _export(args: argparse.Namespace) -> int:
    from edgeplug.exporter import export

    path = export(args.artifacts, args.output, checkpoint=args.checkpoint)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    _qcore_note(args.artifacts)
    return 0


def _qcore_note(artifacts: Path) -> None:
    """A qcore folder's model for the device is the quantized one, not the float model `export` writes."""
    from edgeplug.artifacts import read_report

    if any(entry.get("name") == "qcore" for entry in read_report(artifacts).get("passes", [])):
        print(f"edgeplug: note: {artifacts} was rewritten with the 'qcore' pass: this is its float model. The quantized "
              f"model (recalibrated by 'edgeplug calibrate'): edgeplug export-quantized {artifacts} -o model.onnx "
              "(after 'edgeplug quantize')", file=sys.stderr)


def _profile(args: argparse.Namespace) -> int:
    from edgeplug.atomic import write_text
    from edgeplug.profiling import profile
    from edgeplug.profiling.render import format_profile, plot_profile

    if args.nodes < 0:
        raise EdgeplugError(f"--nodes must be 0 or more, not {args.nodes}")
    result = profile(args.artifacts, args.batch_size, args.steps, args.warmup, measured=not args.static_only)
    print(format_profile(result, nodes=args.nodes))
    if args.json:
        write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_profile(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from edgeplug.plugins import default_host
    from edgeplug.validation import load_schema

    passes = default_host().passes()
    if args.name is None:
        print("recipe\nreport\nprofile\n" + "\n".join(f"{name}  (options of pass '{name}')" for name in sorted(passes)))
        return 0
    if args.name in ("recipe", "report", "profile"):
        document = load_schema(args.name)
    elif args.name in passes:
        document = passes[args.name].factory.options_schema
    else:
        raise EdgeplugError(f"no schema named '{args.name}'; run 'edgeplug schema' for the list")
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return 0


class UsageError(EdgeplugError):
    """A command line argparse refuses (unknown flag, a value of the wrong type): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UsageError (one line naming the flag) instead of usage text
    and SystemExit; subcommand parsers, plugin ones included, are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeplug", description="Make ONNX models trainable on edge devices.")
    parser.add_argument("--version", action="version", version=f"edgeplug {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser("passes", help="list registered passes")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.set_defaults(run=_passes)

    sub = commands.add_parser("inspect", help="ops, parameters, shapes and ops without gradients")
    sub.add_argument("model", type=Path)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.set_defaults(run=_inspect)

    sub = commands.add_parser(
        "rewrite", help="run a recipe's passes and write training artifacts",
        description="Run a recipe's passes on an ONNX model and write onnxruntime-training artifacts. "
                    "New classes from a few examples (a pretrained model, your labels): use the shipped recipe "
                    "'fine-tune' (a new head initialised from the support set's class prototypes, batch norm frozen, "
                    "every layer at lr 1e-5): edgeplug rewrite model.onnx --recipe fine-tune --calibration-data "
                    "support.npz -o out",
    )
    sub.add_argument("model", type=Path)
    sub.add_argument("--recipe", type=Path,
                     help="recipe file (.yaml/.json) or the name of a shipped recipe: fine-tune (new classes from a few "
                          "examples; needs --calibration-data), sparse-update-int8, sparse-update-shortcut, "
                          "sparse-update-shortcut-int8; default: every parameter trains, the model's own head, AdamW 1e-3")
    sub.add_argument("-o", "--output", type=Path, required=True, help="artifact folder to create")
    sub.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    sub.add_argument("--calibration-data", type=Path, help=".npz given to data-driven passes")
    sub.add_argument("--max-memory", metavar="SIZE", help="refuse artifacts whose training step (batch size 1) needs more, e.g. 512M, 2G")
    sub.add_argument("--pass-timeout", type=float, metavar="SECONDS", help="time limit of each pass phase (default: $EDGEPLUG_PASS_TIMEOUT or 600; 0: none)")
    sub.add_argument("--ort-format", action="store_true", help="also write the training, eval and optimizer models in ORT format (.ort)")
    sub.add_argument("--nominal-checkpoint", action="store_true", help="also write a checkpoint without parameter values (nominal_checkpoint)")
    sub.set_defaults(run=_rewrite)

    sub = commands.add_parser("train", help="train an artifact folder on .npz data (resumes automatically)")
    sub.add_argument("artifacts", type=Path)
    sub.add_argument("--data", type=Path, required=True, help="training .npz")
    sub.add_argument("--eval", type=Path, help="evaluation .npz (accuracy before and after every epoch)")
    sub.add_argument("--epochs", type=int, default=1)
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    sub.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every STEPS steps (always at epoch ends)")
    sub.add_argument("--restart", action="store_true", help="discard checkpoints and start from the initial weights")
    sub.add_argument("--no-checkpoints", action="store_true", help="write no checkpoints (no resume; export then gives the initial weights)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_argument("--cache-prefix", action=argparse.BooleanOptionalAction, default=None,
                     help="compute the frozen layers before the first trained one once per example and train only the rest "
                          "(bit-identical weights); default: when it applies and two or more epochs are left")
    sub.add_argument("--cache-memory", metavar="SIZE", default="256M",
                     help="memory for the frozen-prefix cache; examples beyond it go to a temporary file (default 256M)")
    sub.add_argument("--metrics", type=Path, help="write per-epoch metrics as JSON here")
    sub.add_argument("--max-memory", metavar="SIZE", help="refuse to start when the estimated training step needs more, e.g. 512M, 2G")
    sub.add_argument("--runtime", choices=("python", "node"), default="python",
                     help="python: onnxruntime-training here; node: the JavaScript runtime (onnxruntime-web, WebAssembly) in runtimes/web")
    sub.add_argument("--threads", type=int, metavar="N", help="WebAssembly threads of --runtime node (default 1)")
    sub.set_defaults(run=_train)

    sub = commands.add_parser("pack-data", help="write .npz data as a safetensors file for device runtimes (the JavaScript runtime, the web page)")
    sub.add_argument("artifacts", type=Path, help="artifact folder whose inputs the data must fit")
    sub.add_argument("data", type=Path, help=".npz (or .safetensors) data")
    sub.add_argument("-o", "--output", type=Path, required=True, help="the .safetensors file to write")
    sub.set_defaults(run=_pack_data)

    sub = commands.add_parser("export", help="write the inference model with trained weights")
    sub.add_argument("artifacts", type=Path)
    sub.add_argument("-o", "--output", type=Path, required=True)
    sub.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the latest)")
    sub.set_defaults(run=_export)

    sub = commands.add_parser("profile", help="count and measure the memory and compute of a training step")
    sub.add_argument("artifacts", type=Path)
    sub.add_argument("--batch-size", type=int, default=16)
    sub.add_argument("--steps", type=int, default=20, help="timed training steps (median reported)")
    sub.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    sub.add_argument("--static-only", action="store_true", help="count only; run nothing")
    sub.add_argument("--nodes", type=int, default=10, metavar="N", help="show the N costliest nodes (0: none)")
    sub.add_argument("--json", type=Path, help="write the profile as JSON (schemas/profile.schema.json)")
    sub.add_argument("--plot", type=Path, help="write a PNG bar chart (needs matplotlib)")
    sub.set_defaults(run=_profile)

    sub = commands.add_parser("schema", help="print the JSON Schema of recipes, reports or a pass's options")
    sub.add_argument("name", nargs="?", help="recipe, report, profile or a pass name; omit to list")
    sub.set_defaults(run=_schema)

    from edgeplug.fleet.cli import add_fleet_command

    add_fleet_command(commands)

    from edgeplug.plugins import default_host

    default_host().add_commands(commands)
    return parser


def _detail(interrupt: KeyboardInterrupt) -> str:
    """` (while importing plugin 'x')` when the interruption says where it happened."""
    return f" ({_one_line(str(interrupt))})" if str(interrupt) else ""


def _one_line(text: str) -> str:
    """Errors are one line: control characters (newlines in a field name, say) are escaped."""
    return escape(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its standard output passes through `EscapingWriter` (no terminal escapes)."""
    from edgeplug.guard import exit_on_overrun

    previous = exit_on_overrun(True)  # this process is ours: a pass that ignores its time limit ends it (guard.py)
    real_stdout = sys.stdout
    sys.stdout = EscapingWriter(real_stdout)  # type: ignore[assignment]
    try:
        return _main(argv)
    finally:
        exit_on_overrun(previous)
        if sys.stdout is not real_stdout:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            sys.stdout = real_stdout


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
    except EdgeplugError as error:  # a broken plugin: say which, even for --help
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            traceback.print_exc()
        print(f"edgeplug: error: {_one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interrupt:  # Ctrl-C while plugins load (or a plugin raising it): no traceback
        print(f"edgeplug: interrupted{_detail(interrupt)}", file=sys.stderr)
        return INTERRUPTED
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"edgeplug: error: {_one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    try:
        return int(args.run(args))
    except EdgeplugError as error:
        if args.debug:  # the traceback, and the same exit status: --debug must not turn a user error into exit 1
            traceback.print_exc()
        print(f"edgeplug: error: {_one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # e.g. `edgeplug passes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as interrupt:
        print(f"edgeplug: interrupted{_detail(interrupt)}; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return INTERRUPTED
    except MemoryError:
        if args.debug:
            raise
        print("edgeplug: error: out of memory: the model or data needs more memory than this process may use "
              "(ulimit -v, the container's limit, the machine); use less data, a smaller --batch-size or a bigger "
              "machine", file=sys.stderr)
        return EdgeplugError.exit_code
    except Exception as error:
        if args.debug:
            raise
        if is_disk_full(error):  # an OSError, or onnxruntime's RuntimeError saying the same
            print(f"edgeplug: error: {_one_line(str(DiskFullError(disk_full_detail(error))))}", file=sys.stderr)
            return DiskFullError.exit_code
        print(f"edgeplug: internal error: {type(error).__name__}: {_one_line(str(error))} (rerun with --debug for the traceback and report it)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
