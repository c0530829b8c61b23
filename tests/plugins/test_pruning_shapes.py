"""Shape reads that do not pin the channel count: a Gather / Slice of other dimensions, and
``Resize(x, sizes=Concat(Shape(x)[0:2], hw))`` (``F.interpolate(x, size=...)`` as PyTorch
exports it, U^2-Net, CenterNet), where the count in ``sizes`` follows ``x``."""

from __future__ import annotations

import numpy as np
from graphopt_plugins.pruning._graph import const
from onnx import TensorProto, helper, numpy_helper
from test_pruning import (
    assert_runs_like,
    by_label,
    conv,
    feeds_for,
    groups_of,
    model,
    prune_fixed,
    vi,
)


def interp_model(own_shape=True, seed=0):
    """x -> A (4->8) -> relu r; sizes = Concat(Shape(src)[0:2], Shape(r)[2:4] * 2);
    Resize(r, sizes) -> B (8->4) -> y. ``own_shape``: src is r (else the graph input x2,
    whose 8 channels are not r's)."""
    rng = np.random.default_rng(seed)
    a, a_i = conv("A", "x", "a", rng, 8, 4, k=3)
    b, b_i = conv("B", "up", "y", rng, 4, 8, k=1)
    ints = {
        "s0": np.array([0], np.int64),
        "s2": np.array([2], np.int64),
        "s4": np.array([4], np.int64),
        "two": np.array([2], np.int64),
    }
    inits = [*a_i, *b_i, *(numpy_helper.from_array(v, k) for k, v in ints.items())]
    src = "r" if own_shape else "x2"
    nodes = [
        a,
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Shape", [src], ["shp_nc"], name="shape_nc"),
        helper.make_node("Slice", ["shp_nc", "s0", "s2"], ["nc"], name="slice_nc"),
        helper.make_node("Shape", ["r"], ["shp_hw"], name="shape_hw"),
        helper.make_node("Slice", ["shp_hw", "s2", "s4"], ["hw"], name="slice_hw"),
        helper.make_node("Mul", ["hw", "two"], ["hw2"], name="double"),
        helper.make_node("Concat", ["nc", "hw2"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["up"], name="resize", mode="nearest"),
        b,
    ]
    inputs = [vi("x", [1, 4, 6, 6])]
    if not own_shape:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 8, 6, 6]))
    return model(nodes, inputs, [vi("y", [1, 4, 12, 12])], inits)


def test_resize_sizes_read_from_its_own_input_follow_the_channels():
    m = interp_model()
    feeds = feeds_for(m, 6, seed=1)
    _, groups = groups_of(m, feeds[0])
    a = by_label(groups)["A"]
    assert a.prunable, a.reasons
    pruned, _ = prune_fixed(m, feeds, 0.25)
    assert_runs_like(m, pruned, feeds)  # the Resize output has the 6 channels B now reads
    b = next(n for n in pruned.graph if n.name == "B")
    assert const(b.inputs[1]).shape[1] == 6


def test_resize_sizes_from_another_tensor_block():
    m = interp_model(own_shape=False)
    _, groups = groups_of(m, feeds_for(m, 1)[0])
    a = by_label(groups)["A"]
    assert not a.prunable
    assert any("explicit sizes" in r for r in a.reasons), a.reasons
