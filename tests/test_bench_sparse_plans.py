"""bench/sparse_plans.py: the overlap of two sparse-update plans, counted on trained weight values.

The counts decide whether "the strategies chose the same thing" is said in the docs, so each test checks
them against a brute-force count over boolean masks of the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sparse_plans import overlap  # noqa: E402

SHAPES = {"conv": (8, 6, 3, 3), "dw": (6, 1, 3, 3), "fc": (4, 10)}


def _mask(layer: dict, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    if layer["channels"] is None:
        mask[...] = True
    elif layer["weight_axis"] == 0:
        mask[list(layer["channels"])] = True
    else:
        mask[:, list(layer["channels"])] = True
    return mask


@st.composite
def plans(draw: st.DrawFn) -> dict:
    layers = [{"node": "fc", "weight": "fc", "weight_axis": 0, "channels": None}]
    for weight in ("conv", "dw"):
        if draw(st.booleans()):
            shape = SHAPES[weight]
            axis = draw(st.sampled_from([0, 1])) if weight == "conv" else 0
            whole = draw(st.booleans())
            channels = None if whole else sorted(draw(st.sets(st.integers(0, shape[axis] - 1), min_size=1)))
            layers.append({"node": weight, "weight": weight, "weight_axis": axis, "channels": channels})
    return {"layers": layers, "bias_only": [], "classifier": "fc"}


@settings(max_examples=60, deadline=None)
@given(plans(), plans())
def test_overlap_counts_shared_weight_values(a: dict, b: dict) -> None:
    got = overlap(a, b, SHAPES)
    masks = {}
    for name, plan in (("a", a), ("b", b)):
        masks[name] = {w: np.zeros(s, dtype=bool) for w, s in SHAPES.items()}
        for layer in plan["layers"]:
            masks[name][layer["weight"]] |= _mask(layer, SHAPES[layer["weight"]])
    shared = sum(int((masks["a"][w] & masks["b"][w]).sum()) for w in SHAPES)
    union = sum(int((masks["a"][w] | masks["b"][w]).sum()) for w in SHAPES)
    assert got["shared_values"] == shared
    assert got["values_a"] == sum(int(m.sum()) for m in masks["a"].values())
    assert got["value_jaccard"] == shared / union
    backbone_shared = shared - SHAPES["fc"][0] * SHAPES["fc"][1]
    backbone_union = union - SHAPES["fc"][0] * SHAPES["fc"][1]
    assert got["backbone_value_jaccard"] == (backbone_shared / backbone_union if backbone_union else 1.0)


def test_output_and_input_channels_of_one_conv_share_their_crossing() -> None:
    a = {"layers": [{"node": "conv", "weight": "conv", "weight_axis": 0, "channels": [0, 1]}], "bias_only": [], "classifier": "fc"}
    b = {"layers": [{"node": "conv", "weight": "conv", "weight_axis": 1, "channels": [0, 1, 2]}], "bias_only": [], "classifier": "fc"}
    got = overlap(a, b, SHAPES)
    assert got["shared_values"] == 2 * 3 * 9
    assert got["layer_jaccard"] == 1.0 and got["share_a"] == 6 * 9 / (2 * 6 * 9)


def test_channel_masks_round_trip_through_the_file_form() -> None:
    from bench.sparse_plans import _packed

    layers = [{"weight": "conv", "channels": [0, 3, 200, 1279]}, {"weight": "fc", "channels": None}]
    result = {"episodes": [{"plans": {"tinytrain@1": {"layers": [dict(layer) for layer in layers]}}}]}
    packed = _packed(result, pack=True)
    assert isinstance(packed["episodes"][0]["plans"]["tinytrain@1"]["layers"][0]["channels"], str)
    assert _packed(packed, pack=False)["episodes"][0]["plans"]["tinytrain@1"]["layers"] == layers


def test_contains_needs_every_layer_with_the_same_channels() -> None:
    from bench.sparse_plans import _contains

    paper = {"layers": [{"weight": "fc", "channels": None}, {"weight": "dw", "channels": [1, 2]}]}
    fill = {"layers": [*paper["layers"], {"weight": "conv", "channels": [0]}]}
    assert _contains(fill, paper) and not _contains(paper, fill)
    other = {"layers": [{"weight": "fc", "channels": None}, {"weight": "dw", "channels": [1, 3]}, {"weight": "conv", "channels": [0]}]}
    assert not _contains(other, paper)
