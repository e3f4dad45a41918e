"""`edgeplug personalize ...`: the device and cloud halves as separate commands.

Device (forward only, onnxruntime inference): `anchors`, `baseline`, `apply`.
Cloud: `train-generator` (once per device model, onnxruntime-training), `generate`
(one forward pass per device). Files cross between them: anchors.npz up, slots.npz down.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .options import GeneratorOptions

if TYPE_CHECKING:
    import numpy as np


def register(commands: argparse._SubParsersAction) -> None:
    top = commands.add_parser("personalize", help="backprop-free personalisation: anchors, generator, slot files")
    top.set_defaults(run=lambda args: _usage(top))
    sub = top.add_subparsers(dest="personalize_command", metavar="STEP")

    p = sub.add_parser("anchors", help="device: pick representative anchors of unlabelled data and pack them for upload")
    p.add_argument("artifacts", help="artifact folder rewritten with the personalize pass")
    p.add_argument("--data", required=True, help=".npz with the device's unlabelled samples (model input name or x)")
    p.add_argument("-o", "--output", required=True, help="anchors file to upload (.npz)")
    p.add_argument("--count", type=int, default=None, help="number of anchors (default: the generator's, else 8)")
    p.add_argument("--method", choices=["kmeans", "kcenter"], default="kmeans")
    p.add_argument("--generator", help="generator folder: take its anchor count and method")
    p.add_argument("--statistics", metavar="STATS.npz",
                   help="first re-estimate normalisation statistics on the data and keep them in this slot file "
                        "(stays on the device; needed by generators trained with device statistics)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_anchors)

    p = sub.add_parser("train-generator", help="cloud: train the slot generator over labelled source domains")
    p.add_argument("artifacts")
    p.add_argument("--domains", required=True, help=".npz with x, y and domain (integer id per sample)")
    p.add_argument("-o", "--output", required=True, help="generator folder to write")
    defaults = GeneratorOptions()
    for name in ("steps", "batch_size", "hidden", "device_samples", "draws", "count", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--model-statistics", action="store_true",
                   help="generate for the model's own normalisation statistics instead of device re-estimated ones")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--method", choices=["kmeans", "kcenter"], default=defaults.method)
    p.add_argument("--validation-domains", type=float, default=defaults.validation_domains,
                   help="share of source domains held out to choose the best step")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(run=_train)

    p = sub.add_parser("generate", help="cloud: slot values from a device's anchors (one forward pass)")
    p.add_argument("generator", help="generator folder")
    p.add_argument("--anchors", required=True)
    p.add_argument("-o", "--output", required=True, help="slot file to send to the device (.npz)")
    p.set_defaults(run=_generate)

    p = sub.add_parser("baseline", help="device: forward-only slot values (stats re-estimation or prototype classifier)")
    p.add_argument("artifacts")
    p.add_argument("--data", required=True)
    p.add_argument("--method", choices=["stats", "prototype"], required=True)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(run=_baseline)

    p = sub.add_parser("apply", help="device: check a slot file and evaluate and/or export the personalised model")
    p.add_argument("artifacts")
    p.add_argument("--slots", required=True, action="append",
                   help="slot file (from generate, baseline, anchors --statistics or fine-tuning); repeat to combine")
    p.add_argument("--data", help=".npz to predict; accuracy is printed when it has labels y")
    p.add_argument("-o", "--output", help="write the personalised inference model (.onnx)")
    p.set_defaults(run=_apply)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _anchors(args: argparse.Namespace) -> int:
    from edgeplug.plugin_api import DataError, load_npz

    from . import anchors as anchor_ops
    from .device import DeviceModel
    from .generator import device_side, generator_info
    from .slotfile import write_slots

    device = DeviceModel(args.artifacts)
    x = device.inputs(load_npz(args.data), args.data)
    count, method = args.count if args.count is not None else 8, args.method
    if args.generator:  # only its description: the device never loads the generator itself
        info = generator_info(args.generator)
        count, method = args.count if args.count is not None else info["anchors"]["count"], info["anchors"]["method"]
        if info["device_statistics"] and not args.statistics:
            raise DataError(f"the generator in {args.generator} was trained with device statistics: add --statistics STATS.npz")
    side = device_side(device, x, count, method, args.seed, statistics=bool(args.statistics))
    if args.statistics:
        write_slots(args.statistics, side.statistics, device.manifest, "stats", {"samples": len(x)})
        print(f"wrote {args.statistics}: statistics of {len(side.statistics) // 2} normalisation layers (keep it on the device)")
    packed = side.packed
    size = anchor_ops.write_anchors(args.output, packed, device.manifest.fingerprint, method, len(x), x.nbytes,
                                    statistics=bool(args.statistics))
    print(f"wrote {args.output}: {len(packed.codes)} anchors x {packed.codes.shape[1]} features, 8-bit, {size:,} bytes "
          f"(raw samples {x.nbytes:,} bytes: {x.nbytes / size:.1f}x smaller)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from edgeplug.plugin_api import DataError, load_npz

    from .device import DeviceModel
    from .generator import load_domains, train_generator

    device = DeviceModel(args.artifacts)
    domains = load_domains(load_npz(args.domains), device, args.domains)
    options = GeneratorOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
                               device_samples=args.device_samples, draws=args.draws, count=args.count, method=args.method,
                               validation_domains=args.validation_domains, seed=args.seed,
                               device_statistics=not args.model_statistics)
    if not 0 <= args.validation_domains < 1:
        raise DataError("--validation-domains must be a fraction in [0, 1)")
    for name in ("steps", "batch_size", "hidden", "device_samples", "draws", "count"):
        if getattr(options, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1")
    info = train_generator(args.artifacts, domains, args.output, options, force=args.force, echo=print)
    training = info["training"]
    validation = training["validation_accuracy"]
    tail = (f"; held-out source domains: {training['validation_accuracy_untrained']:.4f} untrained -> {validation:.4f}"
            if validation is not None else "")
    print(f"wrote {args.output}/ (best step {training['best_step']}, {training['seconds']:.1f} s{tail})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import anchors as anchor_ops
    from .generator import Generator
    from .slotfile import write_slot_file

    generator = Generator(args.generator)
    packed, meta = anchor_ops.read_anchors(args.anchors, generator.fingerprint)
    values = generator.generate(packed, meta)
    size = write_slot_file(args.output, values, generator.fingerprint, "generator",
                           {"anchors": meta["count"], "samples": meta["samples"]})
    print(f"wrote {args.output}: {len(values)} slots, {sum(v.size for v in values.values()):,} values, {size:,} bytes")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from edgeplug.plugin_api import load_npz

    from . import baselines
    from .device import DeviceModel
    from .slotfile import write_slots

    device = DeviceModel(args.artifacts)
    x = device.inputs(load_npz(args.data), args.data)
    values = baselines.statistics(device, x) if args.method == "stats" else baselines.prototype(device, x)
    size = write_slots(args.output, values, device.manifest, args.method, {"samples": len(x)})
    print(f"wrote {args.output}: {args.method} values for {len(values)} slots from {len(x)} samples, {size:,} bytes")
    return 0


def _apply(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from edgeplug.plugin_api import DataError, load_npz, save_model

    from .device import DeviceModel, accuracy, personalised_model
    from .slotfile import read_slots

    if not args.data and not args.output:
        raise DataError("apply needs --data (to predict) and/or -o (to write the personalised model)")
    device = DeviceModel(args.artifacts)
    values: dict[str, np.ndarray] = {}
    for path in args.slots:
        more, meta = read_slots(path, device.manifest)
        twice = sorted(set(values) & set(more))
        if twice:
            raise DataError(f"{path} sets slot '{twice[0]}' that an earlier --slots file already sets; combine files that fill different slots")
        values.update(more)
        print(f"{path}: {meta['method']} values for {len(more)} slots, checked against device model "
              f"{device.manifest.fingerprint[:12]}")
    if args.data:
        arrays = load_npz(args.data)
        x = device.inputs(arrays, args.data)
        logits = device.logits(x, values)
        if "y" in arrays:
            labels = np.asarray(arrays["y"])
            if labels.shape != (len(x),) or labels.dtype.kind not in "iu":
                raise DataError(f"{args.data}: 'y' must hold one integer class per sample ({len(x)}), not {labels.dtype} {labels.shape}")
            before = accuracy(device.logits(x), arrays["y"])
            print(f"accuracy on {args.data}: {before:.4f} with the model's own values -> {accuracy(logits, arrays['y']):.4f}")
        else:
            print(json.dumps({"predictions": np.argmax(logits, axis=1).tolist()}))
    if args.output:
        save_model(personalised_model(device, values), Path(args.output))
        print(f"wrote {args.output}")
    return 0
