"""The substitution passes (plugin ``graphopt_plugins.substitution``), rule by rule.

Per rule: a model where it must fire (op types and stats checked, numerics checked in
onnxruntime at the pass's tolerance: bit for bit for the EXACT ones), a close model where
it must not (with the near-miss reason ``explain`` gives, where there is one). Then the
latency gate, subgraphs, and the committed fixtures at ``-O2``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphopt_plugins.substitution import _base as sub_base
from graphopt_plugins.substitution.einsum import parse, plan
from graphopt_plugins.substitution.gelu import tanh_error
from graphopt_plugins.substitution.passes import (
    ALL_PASSES,
    Substitute,
    SubstituteExact,
    SubstituteLossy,
    UpgradeOpset,
)
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.pipeline import preset
from graphopt.plugins import load_registry
from graphopt.testing import (
    assert_idempotent,
    assert_numerics_preserved,
    op_types,
    run_model,
    run_pass,
    to_ir,
)

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
RNG = np.random.default_rng(7)
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
EXACT = graphopt.Tolerance.EXACT


# --------------------------------------------------------------------------- builders


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def node(op, inputs, outputs, domain="", **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0] + "_n", domain=domain, **attrs)


def model(nodes, inputs, outputs=None, inits=(), opset=17, ms=False):
    outputs = outputs or [onnx.ValueInfoProto(name="y")]
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    opsets = [helper.make_opsetid("", opset)]
    if ms:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets, ir_version=9 if opset < 21 else 10)
    if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
        # outputs given without a type or shape: take the inferred ones
        inferred = onnx.shape_inference.infer_shapes(m).graph.output
        for o, io in zip(m.graph.output, inferred):
            o.CopyFrom(io)
        del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


def unary(op, x_shape=(2, 3, 4), consts=(), opset=17, elem=F32, **attrs):
    """``y = op(x, *consts)`` with the constants as initializers c0, c1, ..."""
    names = [f"c{i}" for i in range(len(consts))]
    return model(
        [node(op, ["x", *names], ["y"], **attrs)],
        [vi("x", list(x_shape), elem)],
        inits=[init(n, c) for n, c in zip(names, consts)],
        opset=opset,
    )


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def sub(p, m, target="cpu"):
    return run_pass(p, m, PassContext(target=target))


def explain(p, m, target="cpu"):
    ir_model = to_ir(m)
    before = gir.fingerprint(ir_model)
    report = p.explain(ir_model, PassContext(target=target))
    assert gir.fingerprint(ir_model) == before, "explain() changed the model"
    return {e["rule"]: e for e in report}


def reasons(p, m, rule, target="cpu"):
    return [nm["reason"] for nm in explain(p, m, target)[rule]["near_misses"]]


def fired(p, m, rule, target="cpu", tolerance=None, feeds=None):
    """Run the pass; assert ``rule`` fired and the outputs hold; return the new model."""
    out, result = sub(p, m, target)
    assert result.modified and result.stats[rule] >= 1, result.stats
    tol = tolerance or p.tolerance
    if tol is graphopt.Tolerance.LOSSY:
        return out
    assert_numerics_preserved(m, out, tol, feeds=feeds)
    if tol is EXACT:
        assert_bits(m, out, feeds)
    return out


def not_fired(p, m, rule, target="cpu"):
    _, result = sub(p, m, target)
    assert result.stats.get(rule, 0) == 0, result.stats


def assert_bits(before, after, feeds=None):
    """Outputs identical bit for bit (signed zeros included; NaNs only by position)."""
    if feeds is None:
        feeds = [{"x": special(v)} for v in _float_inputs(before)] or None
    if feeds is None:
        return
    for r, o in zip(run_model(before, feeds), run_model(after, feeds)):
        for k in r:
            a, b = np.asarray(r[k]), np.asarray(o[k])
            assert a.shape == b.shape and a.dtype == b.dtype
            if a.dtype.kind == "f":
                nan = np.isnan(a)
                assert np.array_equal(nan, np.isnan(b))
                assert np.array_equal(a[~nan].view(np.uint8), b[~nan].view(np.uint8)), k
            else:
                assert np.array_equal(a, b), k


def _float_inputs(m):
    return [
        tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in m.graph.input
        if i.name == "x"
        and i.type.tensor_type.elem_type == F32
        and len(m.graph.input) == 1
        and all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
    ]


def special(shape):
    """Random float32 data with +-0, +-inf, NaN and subnormals in it."""
    arr = (RNG.standard_normal(shape) * 3).astype(np.float32)
    flat = arr.reshape(-1)
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3e38], np.float32)
    flat[: min(len(vals), flat.size)] = vals[: flat.size]
    return arr


def counts(m):
    return Counter(op_types(m))


# --------------------------------------------------------------------------- registry


def test_passes_registered_at_O2_O3_in_the_substitution_band():
    reg = load_registry()
    for cls in ALL_PASSES:
        assert reg.passes[cls.name] is cls
        assert all(200 <= o < 300 for o in cls.positions())
    assert SubstituteExact.tolerance is EXACT and SubstituteExact.level == 2
    assert UpgradeOpset.tolerance is EXACT and UpgradeOpset.level == 2
    assert Substitute.tolerance is graphopt.Tolerance.APPROXIMATE and Substitute.level == 2
    assert SubstituteLossy.tolerance is graphopt.Tolerance.LOSSY
    names = [s.name for s in preset(2, reg.passes)]
    assert {"substitute-exact", "upgrade-opset", "substitute"} <= set(names)
    assert "substitute-lossy" not in names
    assert "substitute-lossy" in [s.name for s in preset(3, reg.passes)]


# --------------------------------------------------------------------------- neutral elements


@pytest.mark.parametrize(
    ("op", "c", "rule"),
    [
        ("Mul", np.float32(1), "mul_one"),
        ("Mul", np.ones((3, 1), np.float32), "mul_one"),
        ("Div", np.ones(1, np.float32), "div_one"),
        ("Pow", np.float32(1), "pow_one"),
        ("Add", np.float32(-0.0), "add_zero"),
        ("Sub", np.float32(0.0), "sub_zero"),
    ],
)
def test_neutral_element_removed_bit_exactly(op, c, rule):
    m = unary(op, consts=[c])
    out = fired(SubstituteExact(), m, rule)
    assert op not in op_types(out)
    assert_idempotent(SubstituteExact(), out)


def test_neutral_element_commuted_and_integer():
    m = model([node("Mul", ["c", "x"], ["y"])], [vi("x", [4], I64)], inits=[init("c", np.int64(1))])
    out = fired(SubstituteExact(), m, "mul_one")
    assert "Mul" not in op_types(out)


def test_neutral_element_kept_when_it_broadcasts():
    m = unary("Mul", x_shape=(3, 4), consts=[np.ones((2, 3, 4), np.float32)])
    not_fired(SubstituteExact(), m, "mul_one")
    assert any("raise x's rank" in r for r in reasons(SubstituteExact(), m, "mul_one"))
    not_fired(SubstituteExact(), unary("Mul", consts=[np.float32(1.0001)]), "mul_one")


@pytest.mark.parametrize(("op", "zero"), [("Add", 0.0), ("Sub", -0.0)])
def test_signed_zero_forms_are_not_exact_but_approximate(op, zero):
    m = unary(op, consts=[np.float32(zero)])
    rule = "add_zero" if op == "Add" else "sub_zero"
    not_fired(SubstituteExact(), m, rule)
    assert any("-0.0 into +0.0" in r for r in reasons(SubstituteExact(), m, rule))
    out = fired(Substitute(), m, rule)
    assert op not in op_types(out)
    # the only difference: -0.0 in, +0.0 out of the original
    x = special((2, 3, 4))
    ref = run_model(m, [{"x": x}])[0]["y"]
    new = run_model(out, [{"x": x}])[0]["y"]
    assert np.array_equal(ref, new, equal_nan=True)
    assert not np.array_equal(ref.view(np.uint32), new.view(np.uint32))


# --------------------------------------------------------------------------- Sub(0, x) -> Neg


def test_sub_from_negative_zero_is_neg_bit_exactly():
    m = model(
        [node("Sub", ["c", "x"], ["y"])], [vi("x", [2, 3, 4])], inits=[init("c", np.float32(-0.0))]
    )
    out = fired(SubstituteExact(), m, "sub_to_neg")
    assert counts(out) == {"Neg": 1}


def test_sub_from_positive_zero_is_neg_only_approximately():
    m = model(
        [node("Sub", ["c", "x"], ["y"])], [vi("x", [2, 3, 4])], inits=[init("c", np.float32(0.0))]
    )
    not_fired(SubstituteExact(), m, "sub_to_neg")
    assert any("Neg(+0.0) = -0.0" in r for r in reasons(SubstituteExact(), m, "sub_to_neg"))
    out = fired(Substitute(), m, "sub_to_neg")
    assert counts(out) == {"Neg": 1}


def test_sub_from_zero_integers_exact_unsigned_kept():
    m = model([node("Sub", ["c", "x"], ["y"])], [vi("x", [5], I64)], inits=[init("c", np.int64(0))])
    out = fired(SubstituteExact(), m, "sub_to_neg")
    assert counts(out) == {"Neg": 1}
    u = model(
        [node("Sub", ["c", "x"], ["y"])],
        [vi("x", [5], TensorProto.UINT32)],
        inits=[init("c", np.uint32(0))],
    )
    not_fired(SubstituteExact(), u, "sub_to_neg")
    assert any("no Neg kernel" in r for r in reasons(SubstituteExact(), u, "sub_to_neg"))


# --------------------------------------------------------------------------- Pow


def test_pow_square_is_mul_bit_exactly():
    m = unary("Pow", consts=[np.float32(2)])
    out = fired(SubstituteExact(), m, "pow_square")
    assert counts(out) == {"Mul": 1}


def test_pow_square_feeding_reducemean_kept_for_onnxruntime_only():
    m = model(
        [node("Pow", ["x", "two"], ["p"]), node("ReduceMean", ["p"], ["y"], axes=[-1])],
        [vi("x", [2, 3, 4])],
        inits=[init("two", np.float32(2))],
    )
    not_fired(SubstituteExact(), m, "pow_square", target="cpu")
    assert any("LayerNormalization" in r for r in reasons(SubstituteExact(), m, "pow_square"))
    out = fired(SubstituteExact(), m, "pow_square", target="generic")
    assert "Pow" not in op_types(out)


def test_pow_sqrt():
    m = unary("Pow", consts=[np.float32(0.5)])
    not_fired(SubstituteExact(), m, "pow_square")
    out = fired(Substitute(), m, "pow_sqrt", feeds=[{"x": np.abs(f32(2, 3, 4))}])
    assert counts(out) == {"Sqrt": 1}
    not_fired(Substitute(), unary("Pow", consts=[np.float32(0.25)]), "pow_sqrt")
    ints = unary("Pow", consts=[np.int64(2)], elem=I64)  # int Pow goes through double
    not_fired(SubstituteExact(), ints, "pow_square")


# --------------------------------------------------------------------------- Div -> Mul


def test_div_by_power_of_two_is_exact():
    m = unary("Div", consts=[np.array([4.0, 0.5, -0.125, 2.0], np.float32)])
    out = fired(SubstituteExact(), m, "div_to_mul")
    assert counts(out) == {"Mul": 1}


def test_div_by_other_constant_is_approximate():
    m = unary("Div", consts=[np.float32(6.0)])
    not_fired(SubstituteExact(), m, "div_to_mul")
    out = fired(Substitute(), m, "div_to_mul")
    assert counts(out) == {"Mul": 1}
    x = f32(2, 3, 4)
    ref, new = run_model(m, [{"x": x}])[0]["y"], run_model(out, [{"x": x}])[0]["y"]
    assert np.max(np.abs(ref - new) / np.abs(ref)) <= 2 * np.finfo(np.float32).eps


def test_scalar_constants_stay_scalars():
    # a 0-d reciprocal must not become [1] (it would broadcast a scalar x to [1])
    m = unary("Div", x_shape=(), consts=[np.float32(255.0)])
    out = fired(Substitute(), m, "div_to_mul", feeds=[{"x": np.array(3.0, np.float32)}])
    assert run_model(out, [{"x": np.array(3.0, np.float32)}])[0]["y"].shape == ()
    relu6 = model(
        [node("Max", ["x", "lo"], ["t"]), node("Min", ["t", "hi"], ["y"])],
        [vi("x", [])],
        inits=[init("lo", np.float32(0)), init("hi", np.float32(6))],
    )
    out = fired(Substitute(), relu6, "clip_relu6", feeds=[{"x": np.array(7.0, np.float32)}])
    assert all(t.const_value.shape.dims == () for t in out.graph.initializers.values())


def test_div_by_zero_or_integer_kept():
    m = unary("Div", consts=[np.array([2.0, 0.0, 1.0, 4.0], np.float32)])
    not_fired(Substitute(), m, "div_to_mul")
    assert any("zeros" in r for r in reasons(Substitute(), m, "div_to_mul"))
    not_fired(Substitute(), unary("Div", consts=[np.int64(4)], elem=I64), "div_to_mul")


# --------------------------------------------------------------------------- Sum


def test_sum_of_two_is_add_and_of_one_is_nothing():
    two = model([node("Sum", ["x", "z"], ["y"])], [vi("x", [2, 3]), vi("z", [2, 3])])
    out = fired(
        SubstituteExact(), two, "sum_to_add", feeds=[{"x": special((2, 3)), "z": special((2, 3))}]
    )
    assert counts(out) == {"Add": 1}
    one = model([node("Sum", ["x"], ["t"]), node("Relu", ["t"], ["y"])], [vi("x", [2, 3])])
    assert counts(fired(SubstituteExact(), one, "sum_to_add")) == {"Relu": 1}
    three = model([node("Sum", ["x", "x", "x"], ["y"])], [vi("x", [2, 3])])
    not_fired(SubstituteExact(), three, "sum_to_add")


def test_residual_sum_before_layernorm_stays_on_cpu():
    # fuse-layernorm's layernorm_residual_sum writes it; Add would let onnxruntime fuse
    # the pair into its slow CPU SkipLayerNormalization
    nodes = [
        node("Sum", ["x", "z"], ["r"]),
        node("LayerNormalization", ["r", "g"], ["y"], axis=-1),
    ]
    m = model(nodes, [vi("x", [1, 4, 8]), vi("z", [1, 4, 8])],
              inits=[init("g", np.ones(8, np.float32))])
    not_fired(SubstituteExact(), m, "sum_to_add")
    assert counts(fired(SubstituteExact(), m, "sum_to_add", target="generic"))["Add"] == 1


# --------------------------------------------------------------------------- identity-like ops


def _shape_op(op, x_shape, arr, **attrs):
    return model(
        [node(op, ["x", "s"], ["t"], **attrs), node("Relu", ["t"], ["y"])],
        [vi("x", list(x_shape))],
        inits=[init("s", np.array(arr, np.int64))],
    )


@pytest.mark.parametrize(
    ("op", "x_shape", "arr", "rule"),
    [
        ("Expand", (2, 3), [1, 3], "expand_identity"),
        ("Expand", ("N", 3), [3], "expand_identity"),
        ("Tile", (2, 3), [1, 1], "tile_identity"),
        ("Reshape", (2, 3, 4), [0, 3, -1], "reshape_identity"),
        ("Reshape", ("N", 3, 4), [-1, 3, 4], "reshape_identity"),
    ],
)
def test_identity_like_shape_ops_removed(op, x_shape, arr, rule):
    m = _shape_op(op, x_shape, arr)
    shape = [2 if isinstance(d, str) else d for d in x_shape]
    out = fired(SubstituteExact(), m, rule, feeds=[{"x": special(tuple(shape))}])
    assert counts(out) == {"Relu": 1}


@pytest.mark.parametrize(
    ("op", "x_shape", "arr", "rule", "reason"),
    [
        ("Expand", (2, 3), [2, 2, 3], "expand_identity", None),
        ("Expand", ("N", 3), [4, 3], "expand_identity", "dynamic"),
        ("Tile", (2, 3), [1, 2], "tile_identity", None),
        ("Reshape", (2, 3, 4), [3, 2, 4], "reshape_identity", None),
        ("Reshape", ("N", 3, 4), [2, -1, 4], "reshape_identity", "dynamic"),
    ],
)
def test_shape_ops_that_do_something_kept(op, x_shape, arr, rule, reason):
    m = _shape_op(op, x_shape, arr)
    not_fired(SubstituteExact(), m, rule)
    if reason:
        assert any(reason in r for r in reasons(SubstituteExact(), m, rule))


def test_cast_slice_pad_concat_identities():
    big = np.iinfo(np.int64).max
    m = model(
        [
            node("Cast", ["x"], ["a"], to=F32),
            node("Slice", ["a", "st", "en", "ax"], ["b"]),
            node("Pad", ["b", "pads"], ["c"]),
            node("Concat", ["c"], ["d"], axis=0),
            node("Relu", ["d"], ["y"]),
        ],
        [vi("x", [2, 3])],
        inits=[
            init("st", np.array([0], np.int64)),
            init("en", np.array([big], np.int64)),
            init("ax", np.array([1], np.int64)),
            init("pads", np.zeros(4, np.int64)),
        ],
    )
    out, result = sub(SubstituteExact(), m)
    for rule in ("cast_identity", "slice_identity", "pad_identity", "concat_single"):
        assert result.stats[rule] == 1, rule
    assert counts(out) == {"Relu": 1}
    assert_numerics_preserved(m, out, EXACT)
    assert_bits(m, out)


def test_slice_and_cast_that_do_something_kept():
    m = model(
        [
            node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16),
            node("Slice", ["x", "st", "en"], ["y"]),
        ],
        [vi("x", ["N", 3])],
        [vi("a", None, TensorProto.FLOAT16), vi("y", None)],
        inits=[init("st", np.array([0], np.int64)), init("en", np.array([5], np.int64))],
    )
    _, result = sub(SubstituteExact(), m)
    assert not result.modified
    assert any("dynamic" in r for r in reasons(SubstituteExact(), m, "slice_identity"))


# --------------------------------------------------------------------------- Shape folding


def _shape_model(tail_op, *consts):
    names = [f"k{i}" for i in range(len(consts))]
    return model(
        [node("Shape", ["x"], ["s"]), node(tail_op, ["s", *names], ["y"])],
        [vi("x", ["N", 3, 4])],
        [vi("y", None, I64)],
        inits=[init(n, np.array(c, np.int64)) for n, c in zip(names, consts)],
    )


def test_gather_and_slice_of_static_shape_dims_folded():
    feeds = [{"x": f32(5, 3, 4)}]
    g = _shape_model("Gather", 2)
    out = fired(SubstituteExact(), g, "shape_gather", feeds=feeds)
    assert "Gather" not in op_types(out)
    s = _shape_model("Slice", [1], [3])
    out = fired(SubstituteExact(), s, "shape_slice", feeds=feeds)
    assert run_model(out, feeds)[0]["y"].tolist() == [3, 4]


def test_gather_and_slice_of_dynamic_dims_kept():
    g = _shape_model("Gather", 0)
    not_fired(SubstituteExact(), g, "shape_gather")
    assert any("dynamic (N)" in r for r in reasons(SubstituteExact(), g, "shape_gather"))
    s = _shape_model("Slice", [0], [2])
    not_fired(SubstituteExact(), s, "shape_slice")


# --------------------------------------------------------------------------- HardSwish + opset


def hardswish_model(opset):
    return model(
        [
            node("Add", ["x", "three"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Mul", ["x", "c"], ["m"]),
            node("Div", ["m", "six"], ["y"]),
        ],
        [vi("x", [1, 4, 5, 5])],
        inits=[
            init("three", np.float32(3)),
            init("zero", np.float32(0)),
            init("six", np.float32(6)),
        ],
        opset=opset,
    )


def test_hardswish_at_opset_14():
    out = fired(Substitute(), hardswish_model(14), "hardswish")
    assert counts(out) == {"HardSwish": 1}


def test_hardswish_needs_opset_14_and_upgrade_opset_provides_it():
    m = hardswish_model(12)
    not_fired(Substitute(), m, "hardswish")
    # (without div_to_mul, which turns the "/ 6" into "* (1/6)" when HardSwish cannot fire)
    p = Substitute(skip="div_to_mul")
    assert any("opset 12 < 14" in r for r in reasons(p, m, "hardswish"))
    up, result = sub(UpgradeOpset(), m)
    assert result.modified and result.stats["from"] == 12 and result.stats["to"] == 14
    assert result.stats["hardswish_candidates"] == 1
    assert_numerics_preserved(m, up, EXACT)
    out = fired(Substitute(), up, "hardswish")
    assert counts(out) == {"HardSwish": 1}
    assert_numerics_preserved(m, out)


def test_upgrade_opset_does_nothing_without_a_reason_unless_asked():
    m = unary("Relu", opset=12)
    _, result = sub(UpgradeOpset(), m)
    assert not result.modified and result.stats["to"] == 12
    out, result = sub(UpgradeOpset(to=13), m)
    assert result.modified and out.opset_imports[""] == 13
    _, result = sub(UpgradeOpset(to=11), m)
    assert not result.modified and "not downgrading" in result.stats["error"]


def test_hardswish_from_hardsigmoid():
    m = model(
        [node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "h"], ["y"])],
        [vi("x", [1, 4, 5, 5])],
        opset=14,
    )
    out = fired(Substitute(), m, "hardswish_from_hardsigmoid")
    assert counts(out) == {"HardSwish": 1}
    se = model(  # the SE-block gate: HardSigmoid of another tensor
        [node("HardSigmoid", ["z"], ["h"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "h"], ["y"])],
        [vi("x", [1, 4, 5, 5]), vi("z", [1, 4, 1, 1])],
        opset=14,
    )
    not_fired(Substitute(), se, "hardswish_from_hardsigmoid")


# --------------------------------------------------------------------------- Clip / Relu forms


@pytest.mark.parametrize("opset", [10, 17])
@pytest.mark.parametrize("form", ["maxmin", "minmax", "relumin"])
def test_relu6_forms_become_clip(form, opset):
    if form == "maxmin":
        nodes = [node("Max", ["x", "lo"], ["t"]), node("Min", ["t", "hi"], ["y"])]
    elif form == "minmax":
        nodes = [node("Min", ["x", "hi"], ["t"]), node("Max", ["t", "lo"], ["y"])]
    else:
        nodes = [node("Relu", ["x"], ["t"]), node("Min", ["hi", "t"], ["y"])]
    m = model(
        nodes,
        [vi("x", [2, 3, 4])],
        opset=opset,
        inits=[init("lo", np.float32(0)), init("hi", np.float32(6))],
    )
    feeds = [{"x": f32(2, 3, 4) * 5}]
    out = fired(Substitute(), m, "clip_relu6", feeds=feeds)
    assert counts(out) == {"Clip": 1}


def test_min_max_with_crossed_bounds_kept():
    m = model(
        [node("Max", ["x", "lo"], ["t"]), node("Min", ["t", "hi"], ["y"])],
        [vi("x", [2, 3])],
        inits=[init("lo", np.float32(6)), init("hi", np.float32(0))],
    )
    not_fired(Substitute(), m, "clip_relu6")
    assert any("lower bound 6 > upper bound 0" in r for r in reasons(Substitute(), m, "clip_relu6"))


def test_max_zero_and_open_clip_are_relu():
    m = unary("Max", consts=[np.float32(0)])
    assert counts(fired(Substitute(), m, "max_to_relu")) == {"Relu": 1}
    not_fired(Substitute(), unary("Max", consts=[np.float32(0.5)]), "max_to_relu")
    c = model(
        [node("Clip", ["x", "lo"], ["y"])], [vi("x", [2, 3])], inits=[init("lo", np.float32(0))]
    )
    assert counts(fired(Substitute(), c, "clip_to_relu")) == {"Relu": 1}
    c6 = unary("Clip", consts=[np.float32(0), np.float32(6)])
    not_fired(Substitute(), c6, "clip_to_relu")


# --------------------------------------------------------------------------- SiLU


def silu_model(opset=17, scaled=False):
    nodes = [node("Sigmoid", ["s_in"], ["s"]), node("Mul", ["s", "x"], ["y"])]
    inits = []
    if scaled:
        nodes.insert(0, node("Mul", ["x", "a"], ["s_in"]))
        inits = [init("a", np.float32(1.702))]
    else:
        nodes[0] = node("Sigmoid", ["x"], ["s"])
    return model(nodes, [vi("x", [2, 8])], inits=inits, opset=opset)


@pytest.mark.parametrize("scaled", [False, True])
def test_silu_to_quickgelu_for_onnxruntime(scaled):
    out = fired(Substitute(), silu_model(scaled=scaled), "silu")
    assert counts(out) == {"QuickGelu": 1}
    assert gir.to_proto(out).graph.node[0].domain == "com.microsoft"


def test_silu_never_contrib_for_generic_and_swish_from_opset_24():
    m = silu_model()
    not_fired(Substitute(), m, "silu", target="generic")
    assert any("no com.microsoft" in r for r in reasons(Substitute(), m, "silu", "generic"))
    out, result = sub(Substitute(), silu_model(opset=24), "generic")
    assert result.stats["silu"] == 1 and counts(out) == {"Swish": 1}


# --------------------------------------------------------------------------- BN / affine


def bn_model(tail=(), c=4, rank=4):
    shape = [1, c] + [3] * (rank - 2)
    nodes = [node("BatchNormalization", ["x", "g", "b", "m", "v"], ["t0"])]
    inits = [
        init("g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
        init("b", f32(c)),
        init("m", f32(c)),
        init("v", RNG.uniform(0.5, 2, c).astype(np.float32)),
    ]
    prev = "t0"
    for i, (op, arr) in enumerate(tail):
        nodes.append(node(op, [prev, f"k{i}"], [f"t{i + 1}"]))
        inits.append(init(f"k{i}", arr))
        prev = f"t{i + 1}"
    nodes.append(node("Relu", [prev], ["y"]))
    return model(nodes, [vi("x", shape)], inits=inits)


def test_bn_mul_add_chain_becomes_one_bn():
    m = bn_model([("Mul", f32(4, 1, 1)), ("Add", f32(4, 1, 1))])
    out = fired(Substitute(), m, "affine_into_bn")
    assert counts(out) == {"BatchNormalization": 1, "Relu": 1}


def test_non_per_channel_mul_not_folded_into_bn():
    m = bn_model([("Mul", f32(3, 3))])
    not_fired(Substitute(), m, "affine_into_bn")
    assert any("not per-channel" in r for r in reasons(Substitute(), m, "affine_into_bn"))


def test_standalone_bn_to_mul_add_not_for_onnxruntime():
    m = bn_model()
    out = fired(Substitute(), m, "bn_to_mul_add", target="generic")
    assert counts(out) == {"Mul": 1, "Add": 1, "Relu": 1}
    not_fired(Substitute(), m, "bn_to_mul_add", target="cpu")
    assert any("one pass" in r for r in reasons(Substitute(), m, "bn_to_mul_add", "cpu"))


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_constant_chains_merge(op):
    m = model(
        [node(op, ["x", "a"], ["t"]), node(op, ["b", "t"], ["y"])],
        [vi("x", [2, 3])],
        inits=[init("a", f32(3)), init("b", f32(2, 1))],
    )
    out = fired(Substitute(), m, f"{op.lower()}_{op.lower()}")
    assert counts(out) == {op: 1}
    residual = model(
        [node(op, ["x", "a"], ["t"]), node(op, ["t", "x"], ["y"])],
        [vi("x", [2, 3])],
        inits=[init("a", f32(3))],
    )
    not_fired(Substitute(), residual, f"{op.lower()}_{op.lower()}")


# --------------------------------------------------------------------------- ReduceMean


@pytest.mark.parametrize("opset", [17, 18])
def test_reducemean_over_hw_is_global_average_pool(opset):
    if opset >= 18:
        m = model(
            [node("ReduceMean", ["x", "ax"], ["y"])],
            [vi("x", [1, 8, 5, 5])],
            inits=[init("ax", np.array([-1, 2], np.int64))],
            opset=opset,
        )
    else:
        m = unary("ReduceMean", x_shape=(1, 8, 5, 5), axes=[2, 3])
    out = fired(Substitute(), m, "reducemean_to_gap")
    assert counts(out) == {"GlobalAveragePool": 1}


def test_reducemean_without_keepdims_or_rank_3_kept():
    m = unary("ReduceMean", x_shape=(1, 8, 5, 5), axes=[2, 3], keepdims=0)
    not_fired(Substitute(), m, "reducemean_to_gap")
    assert any("keepdims=0" in r for r in reasons(Substitute(), m, "reducemean_to_gap"))
    not_fired(Substitute(), unary("ReduceMean", x_shape=(1, 8, 5), axes=[2]), "reducemean_to_gap")


# --------------------------------------------------------------------------- Einsum


@pytest.mark.parametrize(
    ("eq", "shapes", "ops"),
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], {"MatMul": 1}),
        ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)], {"Transpose": 1, "MatMul": 1}),
        ("ij,jk", [(3, 4), (4, 5)], {"MatMul": 1}),
        ("ik,kj->ji", [(3, 4), (4, 5)], {"MatMul": 1, "Transpose": 1}),
        ("nchw->nhwc", [(1, 2, 3, 4)], {"Transpose": 1}),
    ],
)
def test_einsum_to_matmul(eq, shapes, ops):
    names = ["x", "z"][: len(shapes)]
    m = model(
        [node("Einsum", names, ["y"], equation=eq)], [vi(n, list(s)) for n, s in zip(names, shapes)]
    )
    feeds = [{n: f32(*s) for n, s in zip(names, shapes)}]
    out = fired(Substitute(), m, "einsum_to_matmul", feeds=feeds)
    assert counts(out) == ops
    got = run_model(out, feeds)[0]["y"]
    np.testing.assert_allclose(got, np.einsum(eq, *feeds[0].values()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("eq", "why"),
    [
        ("ii->i", "repeated"),
        ("bij,bjk->bk", "summed away"),
        ("ij,jk->", "summed away"),
        ("ij,ij->ij", "0 k"),
    ],
)
def test_einsum_not_a_matmul_kept(eq, why):
    shapes = [(3, 3)] if eq == "ii->i" else [(3, 4), (4, 5)] if "jk" in eq else [(3, 4), (3, 4)]
    if eq.startswith("bij"):
        shapes = [(2, 3, 4), (2, 4, 5)]
    names = ["x", "z"][: len(shapes)]
    m = model(
        [node("Einsum", names, ["y"], equation=eq)], [vi(n, list(s)) for n, s in zip(names, shapes)]
    )
    not_fired(Substitute(), m, "einsum_to_matmul")
    assert any(why in r for r in reasons(Substitute(), m, "einsum_to_matmul")), reasons(
        Substitute(), m, "einsum_to_matmul"
    )


def test_einsum_plan():
    assert plan(*parse("bij,bjk->bik")) == {"a": None, "b": None, "out": None}
    assert parse("ij,jk") == (["ij", "jk"], "ik")


# --------------------------------------------------------------------------- MatMul <-> Gemm


def test_matmul_followed_by_activation_becomes_gemm_on_onnxruntime():
    m = model(
        [node("MatMul", ["x", "w"], ["t"]), node("Relu", ["t"], ["y"])],
        [vi("x", [4, 8])],
        inits=[init("w", f32(8, 6))],
    )
    out = fired(Substitute(), m, "matmul_to_gemm")
    assert counts(out) == {"Gemm": 1, "Relu": 1}
    not_fired(Substitute(), m, "matmul_to_gemm", target="generic")
    m3 = model(
        [node("MatMul", ["x", "w"], ["t"]), node("Relu", ["t"], ["y"])],
        [vi("x", [2, 4, 8])],
        inits=[init("w", f32(8, 6))],
    )
    not_fired(Substitute(), m3, "matmul_to_gemm")
    assert any("Gemm needs 2-D" in r for r in reasons(Substitute(), m3, "matmul_to_gemm"))


def test_gemm_becomes_matmul_add_for_tensorrt_and_openvino():
    m = model(
        [node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        [vi("x", [4, 8])],
        inits=[init("w", f32(6, 8)), init("b", f32(6))],
    )
    for target in ("tensorrt", "openvino"):
        out = fired(Substitute(), m, "gemm_to_matmul", target=target)
        assert counts(out) == {"MatMul": 1, "Add": 1}
    not_fired(Substitute(), m, "gemm_to_matmul", target="cpu")
    scaled = model(
        [node("Gemm", ["x", "w"], ["y"], alpha=2.0)],
        [vi("x", [4, 8])],
        inits=[init("w", f32(8, 6))],
    )
    not_fired(Substitute(), scaled, "gemm_to_matmul", target="tensorrt")
    assert any("alpha" in r for r in reasons(Substitute(), scaled, "gemm_to_matmul", "tensorrt"))


# --------------------------------------------------------------------------- Resize


def resize_model(scales, mode="linear", ctm="asymmetric", shape=(1, 2, 8, 8), opset=13):
    return model(
        [node("Resize", ["x", "", "sc"], ["y"], mode=mode, coordinate_transformation_mode=ctm)],
        [vi("x", list(shape))],
        inits=[init("sc", np.array(scales, np.float32))],
        opset=opset,
    )


def test_resize_with_unit_scales_removed():
    m = resize_model([1, 1, 1, 1], ctm="half_pixel")
    out = fired(Substitute(), m, "resize_identity")
    assert counts(out) == {"Identity": 1}  # a graph output stays an Identity
    not_fired(Substitute(), resize_model([1, 1, 2, 2], mode="nearest"), "resize_identity")


@pytest.mark.parametrize(
    ("mode", "ctm", "shape", "scales"),
    [
        ("linear", "asymmetric", (1, 2, 8, 8), [1, 1, 0.5, 0.25]),
        ("cubic", "asymmetric", (1, 2, 8, 8), [1, 1, 0.5, 0.5]),
        ("linear", "align_corners", (1, 2, 9, 9), [1, 1, 5 / 9, 5 / 9]),
    ],
)
def test_resize_sampling_whole_pixels_becomes_nearest(mode, ctm, shape, scales):
    m = resize_model(scales, mode=mode, ctm=ctm, shape=shape)
    out = fired(Substitute(), m, "resize_to_nearest")
    modes = [a.s for n in gir.to_proto(out).graph.node for a in n.attribute if a.name == "mode"]
    assert modes == [b"nearest"]


def test_resize_between_pixels_kept():
    half = resize_model([1, 1, 0.5, 0.5], ctm="half_pixel")
    not_fired(Substitute(), half, "resize_to_nearest")
    assert any("between pixels" in r for r in reasons(Substitute(), half, "resize_to_nearest"))
    not_fired(Substitute(), resize_model([1, 1, 2, 2]), "resize_to_nearest")


# --------------------------------------------------------------------------- GELU (LOSSY)


def erf_gelu_model(opset=17):
    return model(
        [
            node("Div", ["x", "sq2"], ["d"]),
            node("Erf", ["d"], ["e"]),
            node("Add", ["e", "one"], ["a"]),
            node("Mul", ["x", "a"], ["m"]),
            node("Mul", ["m", "half"], ["y"]),
        ],
        [vi("x", [2, 16])],
        inits=[
            init("sq2", np.float32(np.sqrt(2))),
            init("one", np.float32(1)),
            init("half", np.float32(0.5)),
        ],
        opset=opset,
    )


@pytest.mark.parametrize(
    ("m", "target", "expect"),
    [
        (lambda: erf_gelu_model(), "cpu", "FastGelu"),
        (
            lambda: model(
                [node("Gelu", ["x"], ["y"], domain="com.microsoft")],
                [vi("x", [2, 16])],
                [vi("y", [2, 16])],
                ms=True,
            ),
            "cpu",
            "FastGelu",
        ),
        (
            lambda: model([node("Gelu", ["x"], ["y"])], [vi("x", [2, 16])], opset=20),
            "generic",
            "Gelu",
        ),
    ],
)
def test_gelu_erf_to_tanh_with_measured_error(m, target, expect):
    m = m()
    out, result = sub(SubstituteLossy(), m, target)
    assert result.stats["gelu_erf_to_tanh"] == 1
    assert result.stats["gelu_tanh_max_abs_per_op"]["max_abs"] == pytest.approx(4.73e-4, rel=1e-2)
    assert counts(out) == {expect: 1}
    x = np.linspace(-6, 6, 32, dtype=np.float32).reshape(2, 16)
    ref, new = run_model(m, [{"x": x}])[0]["y"], run_model(out, [{"x": x}])[0]["y"]
    err = float(np.max(np.abs(ref - new)))
    assert 1e-6 < err < 6e-4  # a real, bounded approximation


def test_gelu_tanh_not_emitted_as_contrib_for_generic():
    m = erf_gelu_model()
    not_fired(SubstituteLossy(), m, "gelu_erf_to_tanh", target="generic")
    assert any(
        "no com.microsoft" in r or "allows no" in r
        for r in reasons(SubstituteLossy(), m, "gelu_erf_to_tanh", "generic")
    )
    assert tanh_error()["at_abs_x"] == pytest.approx(2.70, abs=0.01)


def test_lossy_pass_only_with_a_budget_through_optimize(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(erf_gelu_model(), p)
    with pytest.raises(graphopt.GraphoptError):
        graphopt.optimize(str(p), pipeline="substitute-lossy")
    res = graphopt.optimize(str(p), pipeline="substitute-lossy", budget="cosine>=0.9999")
    rec = res.report.passes[0]
    assert rec.status == "applied", rec.reason
    assert rec.stats["measured"]["y"]["max_abs"] < 6e-4


# --------------------------------------------------------------------------- gate, subgraphs


def test_latency_gate_reverts_a_slower_result(monkeypatch):
    m = unary("Div", consts=[np.float32(6.0)])
    calls = []

    def fake(before, after, ctx, runs=30):
        calls.append(runs)
        return {"ratio": 0.9, "before_ms": 1.0, "after_ms": 1.11, "target": ctx.target}

    monkeypatch.setattr(sub_base, "latency_gate", fake)
    out, result = sub(Substitute(gate="latency", gate_runs=7), m)
    assert calls == [7]
    assert not result.modified and result.stats["gate"]["kept"] is False
    assert result.stats["div_to_mul"] == 1 and counts(out) == {"Div": 1}


def test_latency_gate_keeps_a_result_that_is_not_slower():
    m = unary("Div", x_shape=(64, 64), consts=[np.float32(6.0)])
    p = Substitute(gate="latency", gate_runs=5, gate_min=0.0)
    out, result = sub(p, m)
    gate = result.stats["gate"]
    assert result.modified and gate["kept"] is True and gate["ratio"] > 0
    assert {"before_ms", "after_ms", "p10", "p90", "pairs", "threads"} <= set(gate)
    assert counts(out) == {"Mul": 1}


def test_gate_option_is_checked():
    with pytest.raises(ValueError, match="gate"):
        Substitute(gate="fast")


def test_rules_apply_inside_subgraphs():
    then_g = helper.make_graph(
        [node("Mul", ["x", "one"], ["t"])],
        "then",
        [],
        [vi("t", None)],
        [init("one", np.float32(1))],
    )
    else_g = helper.make_graph(
        [node("Pow", ["x", "two"], ["e"])],
        "else",
        [],
        [vi("e", None)],
        [init("two", np.float32(2))],
    )
    m = model(
        [node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("cond", [], TensorProto.BOOL), vi("x", [2, 3])],
    )
    out, result = sub(SubstituteExact(), m)
    assert result.stats["mul_one"] == 1 and result.stats["pow_square"] == 1
    assert "Pow" not in op_types(out) and "Mul" in op_types(out)
    for cond in (True, False):
        assert_numerics_preserved(
            m, out, EXACT, feeds=[{"cond": np.array(cond), "x": special((2, 3))}]
        )


# --------------------------------------------------------------------------- fixtures at -O2


@pytest.fixture(scope="module")
def o2_runs():
    names = ("cnn", "mlp", "transformer", "constant_weights", "subgraph_if", "dynamic_batch")
    return {n: graphopt.optimize(str(FIXTURES / f"{n}.onnx"), level=2) for n in names}


def test_fixtures_at_O2_no_failure_or_rollback(o2_runs):
    for name, result in o2_runs.items():
        bad = [
            (r.name, r.status, r.reason)
            for r in result.report.passes
            if r.status in ("failed", "rolled-back")
        ]
        assert not bad, f"{name}: {bad}"
        assert result.report.final["status"] == "ok", (name, result.report.final)
        names = [r.name for r in result.report.passes]
        assert "substitute-exact" in names and "substitute" in names


def test_fixtures_generic_target_gets_no_contrib_ops():
    for name in ("transformer", "mlp"):
        res = graphopt.optimize(str(FIXTURES / f"{name}.onnx"), level=2, target="generic")
        assert all(r.status not in ("failed", "rolled-back") for r in res.report.passes)
        domains = {n.domain for n in gir.to_proto(res.model).graph.node}
        assert domains <= {"", "ai.onnx"}, domains
