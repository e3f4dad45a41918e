"""Rows: what a table compares. Recipe rows come from `bench/recipes/*.yaml`; four kinds are built in.

A recipe file is an edgeplug recipe plus a `bench:` section (removed before validation):

    bench:
      label: "last layer"          # shown in tables (default: the file stem)
      order: 10                    # position in tables (default 100)
      families: [images, sensors]  # default: every family
      calibration: true            # a pass of the row reads the support set (its rewrite runs on the device per episode)
      lr_grid: [0.001, 0.01, 0.1]  # default: the family's grid
      compare: [last_layer]        # extra paired comparisons shown for this row
      biases: true                 # add every bias of the model (and the classifier) to `trainable` include
    loss: cross-entropy
    optimizer: {name: adamw}
    passes: [...]

Option values may name run settings, replaced per episode: "$batch_size" (the training
batch), "$budget" (the family's backward-memory budget in bytes for this backbone and
size), "$classes" (the episode's ways), "$episode" (the episode's number, e.g. a per-episode seed). Every recipe row gets `new-head` as its first pass
(the family's options, the episode's ways, the training shots as calibration data: the same
head for every row, checked): recipes list only what the row itself does. The rewrite always
receives the episode's training shots as calibration data.

Built-in kinds: `head` (the new-head prototype classifier, not trained), `manual` (full
fine-tune with artifacts built by hand with `onnxruntime.training.artifacts` and a plain
onnxruntime-training loop: edgeplug's rewrite and trainer play no part), `torch` (PyTorch
eager full fine-tune of the same net; needs the family's torch builder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BENCH_KEYS = {"label", "order", "families", "calibration", "lr_grid", "compare", "biases", "baseline"}
KINDS = ("head", "recipe", "manual", "torch")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    kind: str
    order: float = 100.0
    recipe: Mapping[str, Any] | None = None
    families: tuple[str, ...] | None = None
    calibration: bool = False
    lr_grid: tuple[float, ...] | None = None
    compare: tuple[str, ...] = ()
    biases: bool = False
    source: str | None = None

    @property
    def trains(self) -> bool:
        return self.kind != "head"


BUILT_IN = (
    Row("head_only", "new-head prototypes, no training", "head", order=-10),
    Row("full_manual_ort", "full fine-tune, ORT artifacts by hand (no edgeplug)", "manual", order=1),
    Row("full_torch", "full fine-tune, PyTorch eager", "torch", order=2),
)


def load_recipe_rows(directory: Path = RECIPES) -> list[Row]:
    rows = []
    for path in sorted(directory.glob("*.yaml")):
        import yaml

        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        bench = document.pop("bench", {}) or {}
        unknown = set(bench) - BENCH_KEYS
        if unknown:
            raise SystemExit(f"{path}: unknown bench keys {sorted(unknown)} (allowed: {sorted(BENCH_KEYS)}; see bench/protocol/rows.py)")
        grid = bench.get("lr_grid")
        rows.append(Row(
            name=path.stem, label=str(bench.get("label", path.stem)), kind="recipe", order=float(bench.get("order", 100)),
            recipe=document, families=tuple(bench["families"]) if "families" in bench else None,
            calibration=bool(bench.get("calibration", False)), lr_grid=tuple(float(v) for v in grid) if grid else None,
            compare=tuple(bench.get("compare", ())), biases=bool(bench.get("biases", False)),
            source=str(path.relative_to(directory.parent.parent)) if directory.parent.parent in path.parents else str(path),
        ))
    return rows


def select_rows(family: str, only: Sequence[str] | None = None, skip: Sequence[str] = (), *, directory: Path = RECIPES,
                torch: bool = True) -> list[Row]:
    """The family's rows in table order; `only` picks by name (unknown names are an error)."""
    rows = [r for r in (*BUILT_IN, *load_recipe_rows(directory)) if r.families is None or family in r.families]
    if not torch:
        rows = [r for r in rows if r.kind != "torch"]
    known = {r.name: r for r in rows}
    for name in (*(only or ()), *skip):
        if name not in known:
            raise SystemExit(f"no row {name!r} for family {family} (rows: {', '.join(sorted(known))})")
    if only:  # the head row costs nothing and every run records it (each episode's starting point): always listed
        rows = [r for r in rows if r.kind == "head" and r.name not in only] + [known[name] for name in only]
    rows = [r for r in rows if r.name not in set(skip)]
    return sorted(rows, key=lambda r: (r.order, r.name))


def resolve(value: Any, settings: Mapping[str, Any]) -> Any:
    """Replace "$name" strings anywhere in a recipe by the run's settings."""
    if isinstance(value, str) and value.startswith("$"):
        key = value[1:]
        if key not in settings:
            raise SystemExit(f"recipe value {value!r}: no such setting (known: {', '.join('$' + k for k in sorted(settings))})")
        return settings[key]
    if isinstance(value, Mapping):
        return {k: resolve(v, settings) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, settings) for v in value]
    return value
