"""Peak memory and step time of each `training.memory` setting, side by side on the same artifact folders.

Each (folder, setting, repeat) trains a few steps in a fresh process with exactly the session options the
trainer opens (`edgeplug.trainer.session_options(1, setting)`), one thread, a random batch shaped by the
folder's report; settings are interleaved in a seeded order per repeat, so a load change hits them alike.

    python bench/memory_settings.py --folder lite0_full=/tmp/x/full --folder minilm_lora_all_int8=/tmp/y/lora \
        [--repeats 3] [--steps 6] [--batch-size 16] [--length 64] --name memory_settings

Folders: any edgeplug artifact folder (`edgeplug rewrite MODEL -o DIR [--recipe R]`); the MiniLM ones are what
`bench/text/profile_check.py --work DIR` builds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeplug.memory_settings import MEMORY_SETTINGS

MIB = 2**20


def child(folder: Path, memory: str, steps: int, batch_size: int, length: int) -> None:
    """One training session under `memory`: prints peak RSS (VmHWM) and the step times as JSON."""
    from edgeplug import _ort
    from edgeplug.artifacts import read_report
    from edgeplug.profiling.worker import random_batch
    from edgeplug.trainer import peak_rss_bytes, session_options

    _, module, optimizer = _ort.open_artifacts(folder, session_options=session_options(1, memory))
    batch = random_batch(read_report(folder), batch_size, 6, [None, 6], {"sequence": length})
    times = timed_steps(module, optimizer, batch, steps)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "step_seconds": times}))


def timed_steps(module: Any, optimizer: Any, batch: dict[str, Any], steps: int) -> list[float]:
    """Seconds of each of `steps` training steps (forward, backward, optimizer) of an onnxruntime-training module."""
    module.train()
    inputs, times = list(module.input_names()), []
    for _ in range(steps):
        started = time.perf_counter()
        module(*[batch[name] for name in inputs])
        optimizer.step()
        module.lazy_reset_grad()
        times.append(time.perf_counter() - started)
    return times


def measure(folder: Path, memory: str, args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", str(folder), memory, str(args.steps), str(args.batch_size), str(args.length)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-300:] or "no message"
        return {"error": f"exit {done.returncode}: {detail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", action="append", default=[], metavar="NAME=PATH", help="artifact folder to measure (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per process (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="sequence length of text models")
    parser.add_argument("--name", default="memory_settings")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    folders = dict(item.split("=", 1) for item in args.folder)
    started, load_start = time.time(), os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, object]]]] = {name: {m: [] for m in MEMORY_SETTINGS} for name in folders}
    for repeat in range(args.repeats):
        for name, path in folders.items():
            order = list(MEMORY_SETTINGS)
            random.Random(f"{repeat}/{name}").shuffle(order)
            for memory in order:
                result = measure(Path(path), memory, args)
                runs[name][memory].append(result)
                print(name, memory, repeat, {k: v for k, v in result.items() if k != "step_seconds"}, flush=True)
    rows = [summarise(name, memory, runs[name][memory], runs[name]["arena"]) for name in folders for memory in MEMORY_SETTINGS]
    meta = {"command": "python bench/memory_settings.py " + " ".join(sys.argv[1:]), "load_start": load_start, "load_end": os.getloadavg(),
            "wall_seconds": time.time() - started, "repeats": args.repeats, "steps": args.steps, "batch_size": args.batch_size,
            "length": args.length, "folders": folders}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1) + "\n")
    (args.results / f"{args.name}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def summarise(name: str, memory: str, runs: list[dict[str, object]], arena: list[dict[str, object]]) -> dict[str, object]:
    """Median peak and step of one setting, and both as ratios to the arena's, repeat by repeat."""
    good = [(run, base) for run, base in zip(runs, arena, strict=True) if "error" not in run and "error" not in base]
    if not good:
        return {"folder": name, "memory": memory, "error": next((str(run["error"]) for run in runs if "error" in run), "arena failed")}

    def step(run: dict[str, object]) -> float:
        return statistics.median(list(run["step_seconds"])[1:])  # type: ignore[call-overload]

    return {"folder": name, "memory": memory, "repeats": len(good),
            "peak_mib": statistics.median(int(run["peak_rss_bytes"]) / MIB for run, _ in good),  # type: ignore[call-overload]
            "step_ms": 1000 * statistics.median(step(run) for run, _ in good),
            "peak_vs_arena": statistics.median(int(run["peak_rss_bytes"]) / int(base["peak_rss_bytes"]) for run, base in good),  # type: ignore[call-overload]
            "step_vs_arena": statistics.median(step(run) / step(base) for run, base in good)}


def markdown(meta: dict[str, object], rows: list[dict[str, object]]) -> str:
    load_start, load_end = meta["load_start"], meta["load_end"]
    lines = ["# Training memory settings side by side (`training.memory`)", "",
             f"Command: `{meta['command']}`  ",
             f"Each (folder, setting, repeat) in a fresh process with the trainer's session options, 1 thread, batch {meta['batch_size']}, "
             f"{meta['steps']} steps (median of steps 2..{meta['steps']}), random inputs (text: {meta['length']} tokens, masks all ones); settings "
             f"interleaved in a seeded order per repeat; ratios to `arena` are taken repeat by repeat (same load) and their median shown.  ",
             f"Load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end (2 shared cores); wall {meta['wall_seconds']:.0f} s.  ",  # type: ignore[index]
             "compact = CPU arena on, planner reuse off (the default); arena = onnxruntime's defaults; lean = both off.", "",
             "| folder | memory | repeats | peak RSS (MiB) | peak ÷ arena | median step (ms) | step ÷ arena |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['folder']} | {row['memory']} | 0 | – | – | – | failed: {str(row['error'])[-120:]} |")
            continue
        lines.append(f"| {row['folder']} | {row['memory']} | {row['repeats']} | {row['peak_mib']:.0f} | {row['peak_vs_arena']:.2f} | "
                     f"{row['step_ms']:.0f} | {row['step_vs_arena']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
