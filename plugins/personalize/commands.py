"""`edgeplug personalize ...`: the device and cloud halves as separate commands.

Device (forward only, onnxruntime inference): `anchors`, `baseline`, `apply`.
Cloud: `train-generator` (once per device model, onnxruntime-training), `generate`
(one forward pass per device). Files cross between them: anchors.npz up, slots.npz down.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from edgeplug.plugin_api import CommandRegistry, print_result

from .options import GeneratorOptions

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("edgeplug.plugins.personalize")

GENERATOR_HELP = {
    "steps": "training steps of the generator",
    "batch_size": "examples of one source domain per step (the generator's batch; one domain at a time, so larger than train's)",
    "hidden": "width of the generator's two hidden layers",
    "device_samples": "unlabelled samples a simulated device summarises into anchors",
    "draws": "anchor draws precomputed per source domain (variety of the generator's input)",
    "count": "anchors per device",
    "seed": "seed of the domain order, the draws and the initial weights",
}


def register(commands: CommandRegistry) -> None:
    top = commands.add_parser("personalize", help="backprop-free personalisation: anchors, generator, slot files")
    sub = top.add_subparsers(dest="personalize_command", metavar="STEP", required=True)

    def step(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        return parser

    p = step("anchors", "device: pick representative anchors of unlabelled data and pack them for upload")
    p.add_argument("artifacts", help="artifact folder rewritten with the personalize pass")
    p.add_argument("--data", required=True, metavar="NPZ", help=".npz with the device's unlabelled samples (model input name or x)")
    p.add_argument("-o", "--output", required=True, metavar="ANCHORS", help="anchors file to upload (.npz)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="number of anchors (default: the generator's, else 8)")
    p.add_argument("--method", choices=["kmeans", "kcenter"], default="kmeans",
                   help="how anchors are chosen: k-means centres or k-center (farthest-point) picks (--generator overrides it)")
    p.add_argument("--generator", metavar="DIR", help="generator folder: take its anchor count and method")
    p.add_argument("--statistics", metavar="STATS.npz",
                   help="first re-estimate normalisation statistics on the data and keep them in this slot file "
                        "(stays on the device; needed by generators trained with device statistics)")
    p.add_argument("--seed", type=int, default=0, help="seed of the anchor selection")
    p.set_defaults(run=_anchors)

    p = step("train-generator", "cloud: train the slot generator over labelled source domains")
    p.add_argument("artifacts", help="artifact folder rewritten with the personalize pass")
    p.add_argument("--domains", required=True, metavar="NPZ", help=".npz with x, y and domain (integer id per sample)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="generator folder to write")
    defaults = GeneratorOptions()
    for name, text in GENERATOR_HELP.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), metavar="N", help=text)
    p.add_argument("--model-statistics", action="store_true",
                   help="generate for the model's own normalisation statistics instead of device re-estimated ones")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the generator (cosine decay)")
    p.add_argument("--method", choices=["kmeans", "kcenter"], default=defaults.method, help="how the simulated devices choose anchors")
    p.add_argument("--validation-domains", type=float, default=defaults.validation_domains, metavar="SHARE",
                   help="share of source domains held out to choose the best step")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(run=_train)

    p = step("generate", "cloud: slot values from a device's anchors (one forward pass)")
    p.add_argument("generator", help="generator folder written by train-generator")
    p.add_argument("--anchors", required=True, metavar="ANCHORS", help="anchors file uploaded by the device")
    p.add_argument("-o", "--output", required=True, metavar="SLOTS", help="slot file to send to the device (.npz)")
    p.set_defaults(run=_generate)

    p = step("baseline", "device: forward-only slot values (stats re-estimation or prototype classifier)")
    p.add_argument("artifacts", help="artifact folder rewritten with the personalize pass")
    p.add_argument("--data", required=True, metavar="NPZ", help="the device's samples (.npz; prototype needs labels y)")
    p.add_argument("--method", choices=["stats", "prototype"], required=True,
                   help="stats: re-estimate normalisation statistics; prototype: class means as the classifier")
    p.add_argument("-o", "--output", required=True, metavar="SLOTS", help="slot file to write (.npz)")
    p.set_defaults(run=_baseline)

    p = step("apply", "device: check a slot file and evaluate and/or export the personalised model")
    p.add_argument("artifacts", help="artifact folder rewritten with the personalize pass")
    p.add_argument("--slots", required=True, action="append", metavar="SLOTS",
                   help="slot file (from generate, baseline, anchors --statistics or fine-tuning); repeat to combine")
    p.add_argument("--data", metavar="NPZ", help=".npz to predict; accuracy is printed when it has labels y")
    p.add_argument("-o", "--output", metavar="MODEL", help="write the personalised inference model (.onnx)")
    p.set_defaults(run=_apply)


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
        log.info("wrote %s: statistics of %d normalisation layers (keep it on the device)", args.statistics, len(side.statistics) // 2)
    packed = side.packed
    size = anchor_ops.write_anchors(args.output, packed, device.manifest.fingerprint, method, len(x), x.nbytes,
                                    statistics=bool(args.statistics))
    document = {"output": str(args.output), "anchors": len(packed.codes), "features": int(packed.codes.shape[1]), "bytes": size,
                "raw_bytes": int(x.nbytes), "method": method, "statistics": args.statistics}
    return print_result(document, f"wrote {args.output}: {len(packed.codes)} anchors x {packed.codes.shape[1]} features, 8-bit, "
                                  f"{size:,} bytes (raw samples {x.nbytes:,} bytes: {x.nbytes / size:.1f}x smaller)")


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
    info = train_generator(args.artifacts, domains, args.output, options, force=args.force, echo=log.info)
    training = info["training"]
    validation = training["validation_accuracy"]
    tail = (f"; held-out source domains: {training['validation_accuracy_untrained']:.4f} untrained -> {validation:.4f}"
            if validation is not None else "")
    return print_result({"output": str(args.output), **info}, f"wrote {args.output}/ (best step {training['best_step']}, {training['seconds']:.1f} s{tail})")


def _generate(args: argparse.Namespace) -> int:
    from . import anchors as anchor_ops
    from .generator import Generator
    from .slotfile import write_slot_file

    generator = Generator(args.generator)
    packed, meta = anchor_ops.read_anchors(args.anchors, generator.fingerprint)
    values = generator.generate(packed, meta)
    size = write_slot_file(args.output, values, generator.fingerprint, "generator",
                           {"anchors": meta["count"], "samples": meta["samples"]})
    count = sum(int(v.size) for v in values.values())
    return print_result({"output": str(args.output), "slots": len(values), "values": count, "bytes": size},
                        f"wrote {args.output}: {len(values)} slots, {count:,} values, {size:,} bytes")


def _baseline(args: argparse.Namespace) -> int:
    from edgeplug.plugin_api import load_npz

    from . import baselines
    from .device import DeviceModel
    from .slotfile import write_slots

    device = DeviceModel(args.artifacts)
    x = device.inputs(load_npz(args.data), args.data)
    values = baselines.statistics(device, x) if args.method == "stats" else baselines.prototype(device, x)
    size = write_slots(args.output, values, device.manifest, args.method, {"samples": len(x)})
    return print_result({"output": str(args.output), "method": args.method, "slots": len(values), "samples": len(x), "bytes": size},
                        f"wrote {args.output}: {args.method} values for {len(values)} slots from {len(x)} samples, {size:,} bytes")


def _apply(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from edgeplug.plugin_api import DataError, load_npz, save_model

    from .device import DeviceModel, accuracy, personalised_model
    from .slotfile import read_slots

    if not args.data and not args.output:
        raise DataError("apply needs --data (to predict) and/or -o (to write the personalised model)")
    device = DeviceModel(args.artifacts)
    values: dict[str, np.ndarray] = {}
    document: dict[str, object] = {"slot_files": []}
    lines: list[str] = []
    for path in args.slots:
        more, meta = read_slots(path, device.manifest)
        twice = sorted(set(values) & set(more))
        if twice:
            raise DataError(f"{path} sets slot '{twice[0]}' that an earlier --slots file already sets; combine files that fill different slots")
        values.update(more)
        document["slot_files"].append({"path": str(path), "method": meta["method"], "slots": len(more)})  # type: ignore[attr-defined]
        lines.append(f"{path}: {meta['method']} values for {len(more)} slots, checked against device model {device.manifest.fingerprint[:12]}")
    if args.data:
        arrays = load_npz(args.data)
        x = device.inputs(arrays, args.data)
        logits = device.logits(x, values)
        if "y" in arrays:
            labels = np.asarray(arrays["y"])
            if labels.shape != (len(x),) or labels.dtype.kind not in "iu":
                raise DataError(f"{args.data}: 'y' must hold one integer class per sample ({len(x)}), not {labels.dtype} {labels.shape}")
            before, after = accuracy(device.logits(x), arrays["y"]), accuracy(logits, arrays["y"])
            document.update(accuracy_before=before, accuracy=after)
            lines.append(f"accuracy on {args.data}: {before:.4f} with the model's own values -> {after:.4f}")
        else:
            predictions = np.argmax(logits, axis=1).tolist()
            document["predictions"] = predictions
            lines.append(json.dumps({"predictions": predictions}))
    if args.output:
        save_model(personalised_model(device, values), Path(args.output))
        document["output"] = str(args.output)
        lines.append(f"wrote {args.output}")
    return print_result(document, "\n".join(lines))
