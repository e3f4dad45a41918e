"""The episode loop every family shares: prepare each episode, then its rows, interleaved, each fresh.

A family (images, sensors, ...) supplies a `Family`: the backbone ONNX model (its head is
replaced per episode by `new-head`), its episodes, how to write an episode's three .npz files
(`x`, `y`: training shots, validation shots, query), its settings, and optionally a torch
builder for the PyTorch row. `run_family` returns the result document (meta + one record per
row and episode) that `bench.protocol.report` turns into tables and plots, and rewrites it
after every episode, so a run cut short still leaves results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.protocol.episodes import Episode
from bench.protocol.isolation import ChildFailed, interleaved, run_fresh
from bench.protocol.rows import Row, resolve
from bench.protocol.runners import HEADED, TARGETS


@dataclasses.dataclass
class Settings:
    """Training settings shared by every row of a family run."""

    steps: int = 20  # target optimizer steps per candidate (whole epochs: at least this many)
    batch_size: int = 16
    grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # default learning-rate grid (a row may set its own)
    budget_bytes: int = 28 * 2**20  # "$budget" in recipes: backward-memory budget of the sparse schemes (see bench/run.py)
    threads: int = 1
    head_options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"init": "prototypes"})
    schedule: Mapping[str, Any] | None = None  # lr schedule of the built-in manual/torch rows (recipes say their own)
    seed: int = 0  # episode sampling and row interleaving
    train_seed: int | None = None  # every row's training seed (sample order; Trainer seed); None: the episode's number

    def epochs(self, train_size: int) -> int:
        per_epoch = -(-train_size // min(self.batch_size, train_size))
        return max(1, math.ceil(self.steps / per_epoch))


@dataclasses.dataclass
class Family:
    name: str
    title: str
    model: Path
    episodes: list[Episode]
    write_episode: Callable[[Episode, Path], dict[str, Path]]
    settings: Settings
    description: list[str] = dataclasses.field(default_factory=list)
    torch_builder: str | None = None
    torch_builder_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_family(family: Family, rows: list[Row], work: Path, *, out: Path | None = None, keep: bool = False,
               parallel: int = 1, query_all: bool = False, echo: Callable[[str], None] = print,
               query_chunk: int | None = None) -> dict[str, Any]:
    """Every row on every episode. `parallel` row processes run at once (each with the pinned thread
    count: on 2 idle cores, 2 single-thread rows); `query_all` scores every lr candidate on the query
    set too (for the record; the choice never looks at it); `query_chunk` makes the manual and recipe rows also
    record the chosen candidate's correct query predictions per chunk of that many examples
    (`query_chunk_correct`: what a paired interval over test examples needs)."""
    settings = family.settings
    started, cpu = time.perf_counter(), 0.0
    result: dict[str, Any] = {"meta": {**_meta(family, rows), "parallel_rows": parallel}, "records": [], "prepare": []}
    trained = [r for r in rows if r.trains]
    schedule = interleaved(family.episodes, trained, seed=settings.seed)
    by_episode: dict[int, list[Row]] = {}
    for episode, row in schedule:
        by_episode.setdefault(episode.index, []).append(row)
    for position, episode in enumerate(family.episodes):
        folder = work / f"episode-{episode.index:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        data = {k: str(v) for k, v in family.write_episode(episode, folder).items()}
        train_size = len(episode.train)
        batch = min(settings.batch_size, train_size)
        values = {"batch_size": batch, "budget": settings.budget_bytes, "classes": episode.ways, "episode": episode.index}
        prepare_job = {
            "model": str(family.model), "folder": str(folder), "data": data, "classes": episode.ways,
            "head_options": dict(settings.head_options), "batch_size": batch, "profile": episode is family.episodes[0],
            "rows": [{"name": r.name, "kind": r.kind, "recipe": resolve(dict(r.recipe), values) if r.recipe else None,
                      "calibration": r.calibration, "biases": r.biases} for r in trained if r.kind in ("recipe", "manual")],
        }
        prepared = run_fresh("bench.protocol.runners:prepare_episode", prepare_job, work=folder, tag="prepare", threads=settings.threads)
        cpu += prepared.cpu_seconds
        result["prepare"].append({"episode": episode.index, "cpu_seconds": prepared.cpu_seconds, "wall_seconds": prepared.wall_seconds,
                                  "head_seconds": prepared.result["head"]["seconds"]})
        base = {"episode": episode.index, "domain": episode.domain, "ways": episode.ways, "shots": episode.shots,
                "train_size": train_size, "query_size": len(episode.query), "classes": list(episode.class_names)}
        head = prepared.result["head"]
        result["records"].append({**base, "row": "head_only", "accuracy": head["query_accuracy"], "loss": head["query_loss"],
                                  "validation_accuracy": head["validation_accuracy"], "lr": None})
        if episode is family.episodes[0] and family.torch_builder and any(r.kind == "torch" for r in trained):
            check = run_fresh("bench.protocol.runners:verify_torch", {"builder": family.torch_builder, "builder_args": dict(family.torch_builder_args),
                                                                     "headed": str(folder / HEADED), "query": data["query"]},
                              work=folder, tag="verify-torch", threads=settings.threads)
            result["meta"]["torch_vs_onnx_max_abs_diff"] = check.result["max_abs_diff"]
        jobs = []
        for row in by_episode.get(episode.index, []):
            prep = prepared.result["rows"].get(row.name, {})
            if "error" in prep:
                result["records"].append({**base, "row": row.name, "error": prep["error"]})
                echo(f"  episode {episode.index} {row.name}: skipped ({prep['error'][:160]})")
                continue
            if row.kind == "torch" and not family.torch_builder:
                continue
            job = {"seed": episode.index if settings.train_seed is None else settings.train_seed, "train": data["train"], "validation": data["validation"], "query": data["query"],
                   "grid": list(row.lr_grid or settings.grid), "epochs": settings.epochs(train_size), "batch_size": batch,
                   "schedule": dict(settings.schedule) if settings.schedule else None, "query_all": query_all,
                   "query_chunk": query_chunk}
            if row.kind in ("recipe", "manual"):
                job["artifacts"] = str(folder / row.name)
            if row.kind == "torch":
                job.update(builder=family.torch_builder, builder_args=dict(family.torch_builder_args), headed=str(folder / HEADED))
            jobs.append((row, prep, job, folder))

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for row, prep, done in pool.map(lambda item: _launch(*item, threads=settings.threads), jobs):
                record = {**base, "row": row.name}
                if isinstance(done, ChildFailed):
                    result["records"].append({**record, "error": str(done)[-800:]})
                    echo(f"  episode {episode.index} {row.name}: FAILED\n{done}")
                    continue
                cpu += done.cpu_seconds
                result["records"].append({**record, **done.result, **{k: v for k, v in prep.items() if k != "passes"},
                                          "cpu_seconds": done.cpu_seconds, "wall_seconds": done.wall_seconds})
                if prep.get("passes") and episode is family.episodes[0]:
                    result["meta"].setdefault("pass_summaries", {})[row.name] = prep["passes"]
                r = result["records"][-1]
                memory = r.get("memory") or {}
                accuracy = "  -  " if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
                echo(f"  episode {episode.index} {row.name:<24} acc {accuracy} lr {r.get('lr') or 0:.0e} "
                     f"step {1000 * (r.get('median_step_seconds') or 0):6.0f} ms  fit {r.get('fit_seconds') or 0:5.1f} s  "
                     f"+{(memory.get('rss_added_bytes') or 0) / 2**20:4.0f} MiB  cpu {done.cpu_seconds:5.1f} s")
        echo(f"{episode.describe()}: head {head['query_accuracy']:.3f}; {time.perf_counter() - started:.0f} s so far, cpu {cpu:.0f} s")
        result["meta"].update(wall_seconds=round(time.perf_counter() - started, 1), child_cpu_seconds=round(cpu, 1),
                              episodes_done=position + 1, loadavg_now=os.getloadavg())
        if out is not None:
            write_json(result, out)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def _launch(row: Row, prep: dict[str, Any], job: dict[str, Any], folder: Path, *, threads: int) -> tuple[Row, dict[str, Any], Any]:
    """One row's fresh process; a failure comes back as the ChildFailed (the run goes on)."""
    try:
        return row, prep, run_fresh(TARGETS[row.kind], job, work=folder, tag=row.name, threads=threads)
    except ChildFailed as error:
        return row, prep, error


def row_meta(r: Row) -> dict[str, Any]:
    """A row as a results file records it."""
    return {"name": r.name, "label": r.label, "kind": r.kind, "order": r.order, "source": r.source, "recipe": r.recipe,
            "calibration": r.calibration, "lr_grid": list(r.lr_grid) if r.lr_grid else None, "compare": list(r.compare),
            "biases": r.biases}


def _meta(family: Family, rows: list[Row]) -> dict[str, Any]:
    s = family.settings
    return {
        "family": family.name, "title": family.title, "description": family.description,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "settings": {**dataclasses.asdict(s), "grid": list(s.grid)},
        "episodes": len(family.episodes), "domains": sorted({e.domain for e in family.episodes}),
        "rows": [row_meta(r) for r in rows],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **family.meta,
    }


def write_json(result: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    partial.replace(path)
