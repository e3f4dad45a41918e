"""Per-device overhead of a simulated fleet: 1000 devices x 1 local epoch of the digits sparse folder, one round.

Runs `edgeplug fleet simulate` as a child process (so that its memory and CPU are its own)
and samples, every 50 ms, the resident memory of it and of every process it started (the
worker processes); reports wall time of the round, CPU seconds of the whole process tree
(per device), the peak of the tree's summed RSS and the largest single process's peak.
`--baseline PATH` also runs the engine of another checkout of edgeplug (PYTHONPATH=PATH),
interleaved, for a side-by-side ratio. Writes bench/results/<name>.{md,json}.

    nice python bench/fleet_scale.py --repeats 3 --baseline /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import edgeplug

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = ROOT / "examples" / "digits_fewshot" / "pretrained_cnn.onnx"
RESULTS = HERE / "results"
RECIPE = (ROOT / "examples" / "digits_fewshot" / "fleet_sparse_recipe.yaml").read_text()  # the fleet tests' recipe


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (libraries, the copy-on-write parts) split among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_once(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `command`; wall time, the round's own seconds, CPU of the tree, peak summed RSS, peak single RSS."""
    started = time.perf_counter()
    # cwd elsewhere: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH (--baseline)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tempfile.gettempdir())
    peaks = {"sum": 0, "single": 0, "pss": 0}
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            pids = _tree(process.pid)
            rss = [_status(pid, "VmRSS") for pid in pids]
            peaks["sum"] = max(peaks["sum"], sum(rss))
            peaks["pss"] = max(peaks["pss"], sum(_pss(pid) for pid in pids))
            peaks["single"] = max([peaks["single"], *[_status(pid, "VmHWM") for pid in pids]])
            finished.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = os.times()
    output, _ = process.communicate()
    after = os.times()
    finished.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{command} failed:\n{output[-3000:]}")
    match = re.search(r"round 1/1: .*\(([\d.]+) s\)", output) or re.search(r"round 1: .* ([\d.]+) s", output)
    return {"wall_seconds": time.perf_counter() - started, "round_seconds": float(match.group(1)) if match else float("nan"),
            "cpu_seconds": (after.children_user - before.children_user) + (after.children_system - before.children_system),
            "peak_rss_sum_bytes": peaks["sum"], "peak_rss_single_bytes": peaks["single"], "peak_pss_sum_bytes": peaks["pss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another edgeplug checkout whose `fleet simulate` runs beside this one")
    parser.add_argument("--workers", type=int, help="fleet simulate --workers (default: one per core)")
    parser.add_argument("--baseline-repeats", type=int, help="runs of the baseline (default: --repeats), interleaved from the first")
    parser.add_argument("--name", default="fleet_scale")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"this": []}
    with tempfile.TemporaryDirectory(prefix="edgeplug-fleet-scale-") as tmp:
        work = Path(tmp)
        (work / "sparse.yaml").write_text(RECIPE)
        edgeplug.rewrite(MODEL, work / "sparse.yaml", work / "sparse")
        command = [sys.executable, "-m", "edgeplug.cli", "fleet", "simulate", str(work / "sparse"), "--clients", str(args.clients),
                   "--rounds", "1", "--partition", "iid", "--no-save", "--local-epochs", "1", "--batch-size", "16"]
        if args.workers:
            command += ["--workers", str(args.workers)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.baseline:
            rows["baseline"] = []
        for repeat in range(args.repeats):
            load = os.getloadavg()[0]
            rows["this"].append({**run_once(command, env), "load": load})
            print(f"repeat {repeat}: this {rows['this'][-1]}", flush=True)
            if args.baseline and repeat < (args.repeats if args.baseline_repeats is None else args.baseline_repeats):
                baseline_env = {**env, "PYTHONPATH": str(args.baseline)}
                rows["baseline"].append({**run_once(command, baseline_env), "load": os.getloadavg()[0]})
                print(f"repeat {repeat}: baseline {rows['baseline'][-1]}", flush=True)
    document = {"clients": args.clients, "cores": len(os.sched_getaffinity(0)), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [f"# Fleet scale: {args.clients} devices x 1 local epoch of the digits sparse folder, one round", "",
             f"`nice python bench/fleet_scale.py {' '.join(sys.argv[1:])}` on {document['cores']} cores (shared machine: load average per repeat in the JSON).", "",
             "| engine | round s (median) | wall s incl. start | CPU s of all processes | CPU ms per device | peak RSS, all processes | peak PSS, all processes | peak RSS, largest process | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)
        lines.append(f"| {name} | {median('round_seconds'):.1f} | {median('wall_seconds'):.1f} | {median('cpu_seconds'):.1f} | "
                     f"{1000 * median('cpu_seconds') / args.clients:.1f} | {median('peak_rss_sum_bytes') / 2**20:.0f} MiB | "
                     f"{median('peak_pss_sum_bytes') / 2**20:.0f} MiB | {median('peak_rss_single_bytes') / 2**20:.0f} MiB | {median('load'):.1f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
