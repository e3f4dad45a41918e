"""Does `edgeplug profile`'s count of a training step's memory match what a step adds, on MiniLM-L6?

For each recipe (new-head with a random 6-class head first, as the text family's rows), rewrite MiniLM-L6,
then `edgeplug.profiling.profile(folder, batch, dims={"sequence": L})`: the counted bytes (gradients +
optimizer state + retained activations: what a training step adds over running the model) against the
measured training overhead (peak RSS of training steps minus peak RSS of inference, each in a fresh
process on the same folder, batch and length; masks all ones), under each `--memory` setting (the recipe's
`training.memory`: `arena`, onnxruntime's defaults, or `lean`, where the process holds only live tensors; the
inference baseline runs under the same setting). Writes bench/results/NAME.{json,md} (--name, default text_profile).

    nice python bench/text/profile_check.py [--lengths 64,128] [--batch-size 16] [--only full,lora_last2_int8] [--memory arena,lean]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MIB = 2**20
RECIPES: dict[str, list[dict[str, Any]]] = {
    "full": [],
    "last_layer": [{"name": "trainable", "options": {"layers": "classifier"}}],
    "lora_last2_int8": [{"name": "lora", "options": {"rank": 8, "alpha": 16, "last": 12}}, {"name": "quantize-frozen"}],
    "lora_all_int8": [{"name": "lora", "options": {"rank": 8, "alpha": 16}}, {"name": "quantize-frozen"}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=",".join(RECIPES))
    parser.add_argument("--memory", default="arena,lean", help="comma-separated training.memory settings to measure")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeplug-text-profile")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="text_profile", help="file name of the results (NAME.md, NAME.json)")
    args = parser.parse_args()

    import edgeplug
    from bench.text import minilm
    from edgeplug.errors import EdgeplugError
    from edgeplug.profiling import profile
    from edgeplug.recipe import recipe_from_dict

    model = minilm.exported(args.work / "models")
    lengths = [int(v) for v in args.lengths.split(",")]
    rows = []
    load = os.getloadavg()
    for name, memory in [(name, memory) for name in args.only.split(",") for memory in args.memory.split(",")]:
        folder = args.work / f"{name}-{memory}"
        passes = [{"name": "new-head", "options": {"classes": 6, "init": "random"}}, *RECIPES[name]]
        recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 1e-4}, "training": {"memory": memory},
                                   "passes": passes}, source=name)
        edgeplug.rewrite(model, recipe, folder, force=True)
        for length in lengths:
            started = time.perf_counter()
            try:
                result = profile(folder, args.batch_size, args.steps, 1, dims={"sequence": length})
            except EdgeplugError as error:  # a crashed measurement is a finding: recorded, the others go on
                rows.append({"recipe": name, "memory": memory, "length": length, "batch_size": args.batch_size, "error": str(error)[-300:]})
                print(f"{name:18} {memory:5} L={length:4} FAILED: {str(error)[-200:]}", flush=True)
                continue
            s, m = result.static, result.measured
            assert m is not None
            counted = s.gradient_bytes + s.optimizer_state_bytes + s.retained_activation_bytes
            row = {"recipe": name, "memory": memory, "length": length, "batch_size": args.batch_size,
                   "counted_gradients_optimizer_bytes": s.gradient_bytes + s.optimizer_state_bytes,
                   "counted_retained_activation_bytes": s.retained_activation_bytes, "counted_added_bytes": counted,
                   "parameter_bytes": s.parameter_bytes, "train_peak_rss_bytes": m.train_peak_rss_bytes,
                   "inference_peak_rss_bytes": m.inference_peak_rss_bytes, "baseline_rss_bytes": m.baseline_rss_bytes,
                   "measured_added_bytes": m.training_overhead_bytes, "ratio": m.training_overhead_bytes / counted if counted else None,
                   "median_step_seconds": m.median_step_seconds, "seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"{name:18} {memory:5} L={length:4} counted {counted / MIB:8.1f} MiB (activations {s.retained_activation_bytes / MIB:7.1f}) "
                  f"measured {m.training_overhead_bytes / MIB:8.1f} MiB  ratio {row['ratio']:.2f}  step {m.median_step_seconds * 1e3:.0f} ms",
                  flush=True)
    document = {"command": "python " + " ".join(sys.argv), "load_average_start": load, "load_average_end": os.getloadavg(), "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# MiniLM-L6: counted vs measured training memory (`edgeplug profile`)", "",
        f"Command: `{document['command']}`; batch {args.batch_size}, {args.steps} timed steps after 1 warm-up, random token ids, "
        f"masks all ones, each recipe under `training.memory` {args.memory.replace(',', ' and ')} (the inference baseline under the "
        f"same setting); load average "
        f"{load[0]:.1f} at start, {document['load_average_end'][0]:.1f} at the end (2 shared cores).", "",
        "Counted = gradients + optimizer state + retained activations (`static_profile`); measured = peak RSS of training "
        "steps − peak RSS of inference (fresh process each, same folder, batch and length). Within 25% = ratio 0.75–1.25.", "",
        "| recipe | memory | length | counted grads+opt (MiB) | counted activations (MiB) | counted total added (MiB) | measured added (MiB) | measured / counted | train peak RSS (MiB) | step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['memory']} | {r['length']} | – | – | – | – | – | – | failed: {r['error'][-120:]} |")
            continue
        lines.append(f"| {r['recipe']} | {r['memory']} | {r['length']} | {r['counted_gradients_optimizer_bytes'] / MIB:.1f} | "
                     f"{r['counted_retained_activation_bytes'] / MIB:.1f} | {r['counted_added_bytes'] / MIB:.1f} | "
                     f"{r['measured_added_bytes'] / MIB:.1f} | {r['ratio']:.2f} | {r['train_peak_rss_bytes'] / MIB:.0f} | "
                     f"{r['median_step_seconds'] * 1e3:.0f} |")
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.results}/{args.name}.{{md,json}}")


if __name__ == "__main__":
    main()
