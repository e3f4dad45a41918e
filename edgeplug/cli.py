"""The `edgeplug` command line.

Every command follows one convention (`edgeplug.console`): its result on stdout, as text or, with
`--json`, as one JSON document; what happens on the way through `logging`; progress bars on stderr,
on a terminal only. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeplug import __version__
from edgeplug.commands import ArgumentParser, CommandRegistry, HelpFormatter, UsageError, add_global_options, walk
from edgeplug.console import captured_for_json, cli_logging, output_mode, print_result
from edgeplug.errors import DiskFullError, EdgeplugError, SetupError, disk_full_detail, is_disk_full
from edgeplug.memory_settings import MEMORY_SETTINGS, PREFIX_CACHE_DTYPES
from edgeplug.terminal import EscapingWriter, escape

INTERNAL_ERROR = 1
INTERRUPTED = 130
TRAIN_BATCH_SIZE = 32
"""Default batch size of `train` and `profile` (profile describes the step train runs), unless the recipe's
`training.batch_size` gives one (edgeplug.trainer.DEFAULT_BATCH_SIZE)."""

log = logging.getLogger("edgeplug.cli")  # not __name__: run as `python -m edgeplug.cli` it is __main__


def version_text() -> str:
    """`edgeplug X (onnxruntime-training Y, Python Z)`, read from package metadata: nothing is imported."""
    import importlib.metadata
    import platform

    try:
        runtime = importlib.metadata.version("onnxruntime-training-cpu")
    except importlib.metadata.PackageNotFoundError:
        try:
            runtime = importlib.metadata.version("onnxruntime-training")
        except importlib.metadata.PackageNotFoundError:
            runtime = "not installed"
    return f"edgeplug {__version__} (onnxruntime-training {runtime}, Python {platform.python_version()})"


def require_matplotlib(option: str = "--plot") -> None:
    """Refuse before any work starts when a plot is asked for and matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SetupError(f"{option} needs matplotlib: pip install 'edgeplug[plot]'")


# -- commands ---------------------------------------------------------------------------------------


def _passes(args: argparse.Namespace) -> int:
    from edgeplug.plugins import default_host

    passes = sorted(default_host().passes().values(), key=lambda p: p.name)
    document = [{"name": p.name, "plugin": p.plugin, "version": p.version, "summary": p.summary} for p in passes]

    def text() -> str:
        rows = [("PASS", "PLUGIN", "VERSION", "SUMMARY")] + [(p.name, escape(p.plugin), escape(p.version), escape(p.summary)) for p in passes]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows)

    return print_result(document, text)


def _inspect(args: argparse.Namespace) -> int:
    from edgeplug.inspection import format_inspection, inspect_model

    info = inspect_model(args.model)
    return print_result(info, lambda: format_inspection(info))


def _rewrite(args: argparse.Namespace) -> int:
    from edgeplug.data import load_npz
    from edgeplug.pipeline import rewrite

    calibration = load_npz(args.calibration_data) if args.calibration_data else None
    result = rewrite(args.model, args.recipe, args.output, force=args.force, calibration=calibration,
                     max_memory=args.max_memory, pass_timeout=args.pass_timeout,
                     ort_format=args.ort_format, nominal_checkpoint=args.nominal_checkpoint)
    report = result.report

    def text() -> str:
        lines = [f"{entry['name']:<14} {escape(entry['summary'])}" for entry in report["passes"]]
        params = report["parameters"]
        lines.append(f"wrote {escape(result.output_dir)}/: {params['trainable_count']} trainable parameter tensors "
                     f"({params['trainable_values']:,} of {params['total_values']:,} weight values after the passes), loss {report['training']['loss']} "
                     f"on '{escape(report['training']['output'])}'")
        lines.append(_size_line(report["artifacts"]))
        return "\n".join(lines)

    return print_result({"output": str(result.output_dir), "report": report}, text)


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
    from edgeplug.artifacts import read_recipe_training
    from edgeplug.trainer import Trainer

    defaults = read_recipe_training(args.artifacts)  # the recipe's training section; the command line overrides it
    if args.epochs is None:
        args.epochs = int(defaults.get("epochs", 1))
    if args.batch_size is None:
        args.batch_size = int(defaults.get("batch_size", TRAIN_BATCH_SIZE))
    if args.seed is None:
        args.seed = int(defaults.get("seed", 0))
    if args.plot is not None:
        if args.runtime == "node":
            raise EdgeplugError("--plot applies to --runtime python (the node runtime writes --metrics; plot those)")
        require_matplotlib()
    if args.runtime == "node":
        from edgeplug.node_runtime import train_with_node

        return train_with_node(args)
    if args.threads is not None:
        raise EdgeplugError("--threads applies to --runtime node; the Python runtime uses onnxruntime's default")
    trainer = Trainer(
        args.artifacts, seed=args.seed, lr=args.lr, checkpoint_every=args.checkpoint_every,
        checkpoints=not args.no_checkpoints, max_memory=args.max_memory,
        cache_prefix=args.cache_prefix, cache_memory=args.cache_memory, cache_dtype=args.cache_dtype, memory=args.memory,
        trim_padding=args.trim_padding,
        warn=lambda text: log.warning("%s", text),
    )
    result = trainer.fit(args.data, args.eval, epochs=args.epochs, batch_size=args.batch_size, resume=not args.restart)
    if result.steps_run == 0:
        log.info("nothing to do: the latest checkpoint already covers %d epochs (use --epochs to train longer or --restart)", args.epochs)
    document = _fit_json(result)
    if args.metrics:
        from edgeplug.atomic import write_text

        write_text(Path(args.metrics), json.dumps(document, indent=2) + "\n")
    if args.plot is not None:
        from edgeplug.plots import plot_training

        plot_training(result, args.plot, title=f"edgeplug train {args.artifacts} (batch {args.batch_size}, lr {trainer.lr:g})")
        log.info("wrote %s", args.plot)
    step = f"{result.median_step_seconds * 1000:.1f} ms" if result.median_step_seconds is not None else "-"
    return print_result(document, f"done: {result.steps_run} steps, median step {step}, peak memory {result.peak_rss_bytes / 2**20:.0f} MiB")


def _meta_pretrain(args: argparse.Namespace) -> int:
    from edgeplug.meta_pretrain import MetaSettings, meta_pretrain

    settings = MetaSettings(episodes=args.episodes, ways=args.ways, shots=args.shots, queries=args.queries,
                            steps_per_episode=args.steps_per_episode, learning_rate=args.lr, optimizer=args.optimizer,
                            scale=args.scale, seed=args.seed, threads=args.threads)
    every = max(1, args.episodes // 10)

    def report(episode: int, loss: float, accuracy: float) -> None:
        if (episode + 1) % every == 0:
            log.info("episode %d/%d: loss %.4f, query accuracy %.3f", episode + 1, args.episodes, loss, accuracy)

    if args.checkpoint_every < 1:
        raise EdgeplugError(f"--checkpoint-every must be at least 1, not {args.checkpoint_every}")
    result = meta_pretrain(args.model, args.data, args.output, settings, on_episode=report,
                           checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
    document = result.summary()
    if args.metrics:
        from edgeplug.atomic import write_text

        write_text(Path(args.metrics), json.dumps(document, indent=2) + "\n")
    first, last = document["first_tenth"], document["last_tenth"]
    return print_result(document, f"wrote {escape(args.output)}: {result.episodes} episodes in {result.seconds:.0f} s, "
                                  f"{result.trainable_values:,} values trained; query accuracy before each update "
                                  f"{first['query_accuracy']:.3f} (first tenth) -> {last['query_accuracy']:.3f} (last tenth), "
                                  f"loss {first['loss']:.3f} -> {last['loss']:.3f}")


def _dims(values: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for value in values:
        name, _, length = value.partition("=")
        if not name or not length.strip().isdigit() or int(length) < 1:
            raise EdgeplugError(f"--dim {value!r}: give NAME=N with N a whole number, at least 1 (e.g. --dim sequence=128)")
        dims[name.strip()] = int(length)
    return dims


def _pack_data(args: argparse.Namespace) -> int:
    from edgeplug.node_runtime import pack_data

    path, count = pack_data(args.artifacts, args.data, args.output)
    size = path.stat().st_size
    return print_result({"output": str(path), "samples": count, "bytes": size},
                        f"wrote {escape(path)}: {count} samples ({size / 1e6:.2f} MB)")


def _fit_json(result: Any) -> dict[str, Any]:
    import dataclasses

    document: dict[str, Any] = dataclasses.asdict(result)
    return document


def _export(args: argparse.Namespace) -> int:
    from edgeplug.exporter import export

    path = export(args.artifacts, args.output, checkpoint=args.checkpoint)
    size = path.stat().st_size
    _qcore_note(args.artifacts)
    return print_result({"output": str(path), "bytes": size}, f"wrote {escape(path)} ({size / 1e6:.2f} MB)")


def _qcore_note(artifacts: Path) -> None:
    """A qcore folder's model for the device is the quantized one, not the float model `export` writes."""
    from edgeplug.artifacts import read_report

    if any(entry.get("name") == "qcore" for entry in read_report(artifacts).get("passes", [])):
        log.warning("%s was rewritten with the 'qcore' pass: this is its float model. The quantized model (recalibrated by "
                    "'edgeplug calibrate'): edgeplug export-quantized %s -o model.onnx (after 'edgeplug quantize')", artifacts, artifacts)


def _profile(args: argparse.Namespace) -> int:
    from edgeplug.atomic import write_text

    if args.plot:
        require_matplotlib()
    if args.nodes < 0:
        raise EdgeplugError(f"--nodes must be 0 or more, not {args.nodes}")
    output = args.output
    if isinstance(args.json, str):  # the old `--json FILE`
        log.warning("'--json FILE' is deprecated: use '-o FILE' to write the profile to a file (--json alone prints it)")
        output = output or Path(args.json)
    from edgeplug.profiling import profile
    from edgeplug.profiling.render import format_profile, plot_profile

    if args.batch_size is None:
        from edgeplug.artifacts import read_recipe_training

        args.batch_size = int(read_recipe_training(args.artifacts).get("batch_size", TRAIN_BATCH_SIZE))
    result = profile(args.artifacts, args.batch_size, args.steps, args.warmup, measured=not args.static_only, dims=_dims(args.dim))
    document = result.to_dict()
    if output:
        write_text(Path(output), json.dumps(document, indent=2) + "\n")
        log.info("wrote %s", output)
    if args.plot:
        plot_profile(result, args.plot)
        log.info("wrote %s", args.plot)
    return print_result(document, lambda: format_profile(result, nodes=args.nodes))


def _schema(args: argparse.Namespace) -> int:
    from edgeplug.plugins import default_host
    from edgeplug.recipe import recipe_schema
    from edgeplug.validation import load_schema, schema_names

    passes = default_host().passes()
    shipped = [name for name in schema_names() if not name.startswith("passes/")]
    if args.name is None:
        listed = [{"name": name, "describes": str(load_schema(name).get("title", "shipped schema"))} for name in shipped]
        listed += [{"name": name, "describes": f"options of pass '{name}' (plugin '{passes[name].plugin}')"} for name in sorted(passes)]
        width = max(len(entry["name"]) for entry in listed)
        return print_result(listed, lambda: "\n".join(f"{entry['name']:<{width}}  {entry['describes']}" for entry in listed))
    if args.name == "recipe" and not args.bare:
        document: Any = recipe_schema()
    elif args.name in shipped:
        document = load_schema(args.name)
    elif args.name in passes:
        document = passes[args.name].factory.options_schema
    else:
        raise EdgeplugError(f"no schema named '{args.name}'; run 'edgeplug schema' for the list")
    return print_result(document, lambda: json.dumps(document, indent=2, ensure_ascii=False))


def _completion(args: argparse.Namespace) -> int:
    from edgeplug.completion import completion_script

    script = completion_script(build_parser(), args.shell)
    return print_result({"shell": args.shell, "script": script}, script.rstrip("\n"))


# -- the parser -----------------------------------------------------------------------------------------


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command tree: core commands, `fleet`, and (with `plugins`) the installed plugins' commands.
    Every parser gets the global options and the help format that shows defaults."""
    parser = ArgumentParser(
        prog="edgeplug", description="Make ONNX models trainable on edge devices.", formatter_class=HelpFormatter,
        epilog="Global options work before or after the command. Run 'edgeplug COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit (loads no plugin)")
    add_global_options(parser, top_level=True)
    commands = CommandRegistry(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    sub = commands.add_parser("passes", help="list registered passes")
    sub.set_defaults(run=_passes)

    sub = commands.add_parser("inspect", help="ops, parameters, shapes and ops without gradients")
    sub.add_argument("model", type=Path, help="the .onnx model to describe")
    sub.set_defaults(run=_inspect)

    sub = commands.add_parser(
        "rewrite", help="run a recipe's passes and write training artifacts",
        description="Run a recipe's passes on an ONNX model and write onnxruntime-training artifacts. "
                    "New classes from a few examples (a pretrained model, your labels): use the shipped recipe "
                    "'fine-tune' (a new head initialised from the support set's class prototypes, batch norm frozen, "
                    "every layer at lr 1e-5): edgeplug rewrite model.onnx --recipe fine-tune --calibration-data "
                    "support.npz -o out",
    )
    sub.add_argument("model", type=Path, help="the .onnx model to make trainable")
    sub.add_argument("--recipe", type=Path,
                     help="recipe file (.yaml/.json) or the name of a shipped recipe: fine-tune (new classes from a few "
                          "examples; needs --calibration-data), sparse-update-int8, sparse-update-shortcut, "
                          "sparse-update-shortcut-int8; default: every parameter trains, the model's own head, AdamW 1e-3")
    sub.add_argument("-o", "--output", type=Path, required=True, help="artifact folder to create")
    sub.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    sub.add_argument("--calibration-data", type=Path, metavar="NPZ", help=".npz given to data-driven passes (e.g. a labelled support set)")
    sub.add_argument("--max-memory", metavar="SIZE", help="refuse artifacts whose training step (batch size 1) needs more, e.g. 512M, 2G")
    sub.add_argument("--pass-timeout", type=float, metavar="SECONDS", help="time limit of each pass phase (default: $EDGEPLUG_PASS_TIMEOUT or 600; 0: none)")
    sub.add_argument("--ort-format", action="store_true", help="also write the training, eval and optimizer models in ORT format (.ort)")
    sub.add_argument("--nominal-checkpoint", action="store_true", help="also write a checkpoint without parameter values (nominal_checkpoint)")
    sub.set_defaults(run=_rewrite)

    sub = commands.add_parser("train", help="train an artifact folder on .npz data (resumes automatically)")
    sub.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    sub.add_argument("--data", type=Path, required=True, metavar="NPZ", help="training .npz")
    sub.add_argument("--eval", type=Path, metavar="NPZ", help="evaluation .npz (accuracy before and after every epoch)")
    sub.add_argument("--epochs", type=int, metavar="N",
                     help="total epochs; a resumed run trains until N are done (default: the recipe's training.epochs, else 1)")
    sub.add_argument("--batch-size", type=int, metavar="N",
                     help=f"examples per step; a resumed run must keep it (default: the recipe's training.batch_size, else {TRAIN_BATCH_SIZE})")
    sub.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    sub.add_argument("--seed", type=int, metavar="N", help="seed of the sample order and random ops (default: the recipe's training.seed, else 0)")
    sub.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every STEPS steps (always at epoch ends)")
    sub.add_argument("--restart", action="store_true", help="discard checkpoints and start from the initial weights")
    sub.add_argument("--no-checkpoints", action="store_true", help="write no checkpoints (no resume; export then gives the initial weights)")
    sub.add_argument("--cache-prefix", action=argparse.BooleanOptionalAction, default=None,
                     help="compute the frozen layers before the first trained one once per example and train only the rest "
                          "(bit-identical weights); default: when it applies and two or more epochs are left")
    sub.add_argument("--cache-memory", metavar="SIZE", default="256M",
                     help="memory for the frozen-prefix cache; examples beyond it go to a temporary file")
    sub.add_argument("--cache-dtype", choices=PREFIX_CACHE_DTYPES,
                     help="how the frozen-prefix cache stores float32 tensors: float32 (exact, bit-identical weights) or float16 "
                          "(half the bytes, cast back before each step; close to float32, not bit-identical); default: the "
                          "recipe's training.prefix_cache_dtype (float32); Python runtime only")
    sub.add_argument("--trim-padding", action=argparse.BooleanOptionalAction, default=None,
                     help="cut each batch to its longest attention mask (models with an integer '*mask*' input whose sequence "
                          "axis is dynamic); default: when one padded batch gives the same outputs trimmed (checked first)")
    sub.add_argument("--metrics", type=Path, metavar="FILE", help="also write the result (what --json prints) to FILE")
    sub.add_argument("--plot", type=Path, metavar="PNG",
                     help="write loss and accuracy curves (every step; per epoch, training and evaluation) as a PNG; "
                          "needs matplotlib: pip install 'edgeplug[plot]'")
    sub.add_argument("--max-memory", metavar="SIZE", help="refuse to start when the estimated training step needs more, e.g. 512M, 2G")
    sub.add_argument("--memory", choices=MEMORY_SETTINGS,
                     help="compact: onnxruntime's CPU arena without its planned buffer reuse (less memory than arena, as fast); "
                          "arena: onnxruntime's defaults; lean: no arena, no planned buffer reuse, freed tensors go back to the "
                          "system (least memory, slower steps); default: the recipe's training.memory (compact)")
    sub.add_argument("--runtime", choices=("python", "node"), default="python",
                     help="python: onnxruntime-training here; node: the JavaScript runtime (onnxruntime-web, WebAssembly) in runtimes/web")
    sub.add_argument("--threads", type=int, metavar="N", help="WebAssembly threads of --runtime node (default: 1)")
    sub.set_defaults(run=_train)

    sub = commands.add_parser("pack-data", help="write .npz data as a safetensors file for device runtimes (the JavaScript runtime, the web page)")
    sub.add_argument("artifacts", type=Path, help="artifact folder whose inputs the data must fit")
    sub.add_argument("data", type=Path, help=".npz (or .safetensors) data")
    sub.add_argument("-o", "--output", type=Path, required=True, help="the .safetensors file to write")
    sub.set_defaults(run=_pack_data)

    sub = commands.add_parser("export", help="write the inference model with trained weights")
    sub.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite' (and trained)")
    sub.add_argument("-o", "--output", type=Path, required=True, help="the .onnx inference model to write")
    sub.add_argument("--checkpoint", type=Path, help="checkpoint folder or state file (default: the latest, else the initial weights)")
    sub.set_defaults(run=_export)

    sub = commands.add_parser("meta-pretrain", help="meta-train a model's backbone on few-shot episodes of source data (cloud side)",
                              description="Episodic (ProtoNet-style) meta-training of every backbone parameter: each episode's "
                                          "support set gives the new-head pass's prototype head, its query set the loss. "
                                          "Writes the model with its own classifier and the meta-trained backbone.")
    sub.add_argument("model", type=Path, help="the .onnx classifier whose backbone to meta-train")
    sub.add_argument("--data", type=Path, required=True, metavar="NPZ",
                     help="source examples: images 'x' (or the input's name), integer labels 'y', optional integer 'domain'")
    sub.add_argument("-o", "--output", type=Path, required=True, help="the .onnx model to write")
    sub.add_argument("--episodes", type=int, default=200, metavar="N", help="episodes (one optimizer step each by default)")
    sub.add_argument("--ways", type=int, default=5, metavar="N", help="classes per episode (fewer when a domain has fewer)")
    sub.add_argument("--shots", type=int, default=5, metavar="N", help="support examples per class")
    sub.add_argument("--queries", type=int, default=5, metavar="N", help="query examples per class")
    sub.add_argument("--steps-per-episode", type=int, default=1, metavar="N", help="optimizer steps on each episode")
    sub.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    sub.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer of every backbone parameter")
    sub.add_argument("--scale", type=float, default=10.0, help="the prototype head's logit scale (new-head's 'scale')")
    sub.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the episode draws")
    sub.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: onnxruntime's)")
    sub.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                     help="save weights, optimizer state and episode draws here; the same command run again resumes from the last save")
    sub.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="episodes between saves to --checkpoint-dir")
    sub.add_argument("--metrics", type=Path, metavar="FILE", help="also write the result (what --json prints) to FILE")
    sub.set_defaults(run=_meta_pretrain)

    sub = commands.add_parser("profile", help="count and measure the memory and compute of a training step")
    sub.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    sub.add_argument("--batch-size", type=int, metavar="N",
                     help=f"batch size of the counts and the measurements (default: train's, i.e. the recipe's training.batch_size, else {TRAIN_BATCH_SIZE})")
    sub.add_argument("--steps", type=int, default=20, metavar="N", help="timed training steps (median reported)")
    sub.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first")
    sub.add_argument("--static-only", action="store_true", help="count only; run nothing")
    sub.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                     help="length of a named dynamic input axis besides the batch, e.g. --dim sequence=128 (repeatable)")
    sub.add_argument("--nodes", type=int, default=10, metavar="N", help="show the N costliest nodes (0: none)")
    sub.add_argument("-o", "--output", type=Path, metavar="FILE", help="also write the profile as JSON to FILE (edgeplug schema profile)")
    sub.add_argument("--json", nargs="?", const=True, default=argparse.SUPPRESS, metavar="FILE",
                     help="print the profile as one JSON document on stdout ('--json FILE' is a deprecated alias of -o FILE)")
    sub.add_argument("--plot", type=Path, metavar="PNG", help="write a PNG chart (needs matplotlib: pip install 'edgeplug[plot]')")
    sub.set_defaults(run=_profile)

    sub = commands.add_parser("schema", help="list the JSON Schemas, or print one (recipes, reports, profiles, a pass's options)")
    sub.add_argument("name", nargs="?", help="a name from the list ('recipe', 'report', 'profile', a pass name, ...); omit to list")
    sub.add_argument("--bare", action="store_true",
                     help="recipe: the shipped file as is (default: with the installed passes' names and options filled in, for editors)")
    sub.set_defaults(run=_schema)

    sub = commands.add_parser("completion", help="print a shell completion script (commands, options, choices; plugins' included)",
                              description="Print a shell completion script. bash: eval \"$(edgeplug completion bash)\" in ~/.bashrc, or "
                                          "edgeplug completion bash > ~/.local/share/bash-completion/completions/edgeplug. zsh: "
                                          "eval \"$(edgeplug completion zsh)\" in ~/.zshrc. Regenerate after installing a plugin.")
    sub.add_argument("shell", nargs="?", choices=("bash", "zsh"), default="bash", help="the shell to complete in")
    sub.set_defaults(run=_completion)

    from edgeplug.fleet.cli import add_fleet_command

    add_fleet_command(commands)

    if plugins:
        from edgeplug.plugins import default_host

        default_host().add_commands(commands)
    for _, command in walk(parser):
        command.formatter_class = HelpFormatter
        if command is not parser:
            add_global_options(command, top_level=False)
    return parser


# -- running a command ----------------------------------------------------------------------------------


def _detail(interrupt: KeyboardInterrupt) -> str:
    """` (while importing plugin 'x')` when the interruption says where it happened."""
    return f" ({_one_line(str(interrupt))})" if str(interrupt) else ""


def _one_line(text: str) -> str:
    """Errors are one line: control characters (newlines in a field name, say) are escaped."""
    return escape(text)


def _asks_version(argv: Sequence[str]) -> bool:
    """`--version` before the command: answered before any plugin (or onnx) is imported."""
    for token in argv:
        if token == "--version":
            return True
        if not token.startswith("-"):
            return False
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its standard output passes through `EscapingWriter` (no terminal escapes)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if _asks_version(arguments):
        print(version_text())
        return 0
    from edgeplug.guard import exit_on_overrun

    previous = exit_on_overrun(True)  # this process is ours: a pass that ignores its time limit ends it (guard.py)
    real_stdout = sys.stdout
    sys.stdout = EscapingWriter(real_stdout)  # type: ignore[assignment]
    try:
        return _main(arguments)
    finally:
        exit_on_overrun(previous)
        if sys.stdout is not real_stdout:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            sys.stdout = real_stdout


def _main(argv: list[str]) -> int:
    try:
        parser = build_parser()
    except EdgeplugError as error:  # a broken plugin: say which, even for --help
        if "--debug" in argv:
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
    from edgeplug import progress

    json_output = getattr(args, "json", False) is True
    previous = progress.set_enabled(False if (args.quiet or args.no_progress) else None)
    try:
        with cli_logging(json_output=json_output, quiet=args.quiet, verbose=args.verbose):
            return _run(args, json_output)
    finally:
        progress.set_enabled(previous)


def _run(args: argparse.Namespace, json_output: bool) -> int:
    if not json_output:
        return _guarded(args)
    with captured_for_json() as held:
        code = _guarded(args)
    text = held.getvalue()
    if code == 0 and not output_mode().result_printed:  # a command that predates print_result: wrap what it printed
        sys.stdout.write(json.dumps({"command": args.command, "output": text}, indent=2, ensure_ascii=False) + "\n")
    elif text:
        sys.stderr.write(text)
    return code


def _guarded(args: argparse.Namespace) -> int:
    """The command's exit status; its errors as one line (with --debug: the traceback)."""
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
