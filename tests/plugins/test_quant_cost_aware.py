"""The cost-aware mixed-precision search of the int8 pass (``cost_aware_precision``): the
algorithm on a stand-in scorer whose error is known, so the expected split is computed by
hand."""

from __future__ import annotations

import math
from typing import Any

from graphopt_plugins.quantization.passes import Candidate, Deadline, cost_aware_precision

# node: (work in MACs, output noise power when only this node is int8)
NODES = {
    "a": (100, 0.001),  # cheap in error, much work: int8 first
    "b": (100, 0.004),
    "c": (10, 0.002),  # little work for its error: float before a and b
    "d": (50, 0.020),  # the worst per MAC
    "e": (100, 0.003),
}
ALL = frozenset(NODES)


class _Scorer:
    """Noise of a split = the sum of the isolated noises of its int8 nodes (the additive
    model the search assumes); the budget holds below ``limit_noise``."""

    def __init__(self, limit_noise: float, rebuilt_penalty: float = 0.0) -> None:
        self.limit_noise = limit_noise
        self.rebuilt_penalty = rebuilt_penalty
        self.calls = 0
        self.feeds = [{}] * 4

    def score(self, model: Any, limit: int | None = None) -> dict[str, Any]:
        self.calls += 1
        int8, rebuilt = model
        noise = sum(NODES[n][1] for n in int8) + (self.rebuilt_penalty if rebuilt else 0.0)
        ok = noise <= self.limit_noise
        q = -10 * math.log10(noise) if noise > 0 else float("inf")
        return {"ok": ok, "quality": q, "sqnr_db": q, "violations": [] if ok else ["noise"]}


def _run(scorer: _Scorer) -> tuple[Candidate, dict[str, Any]]:
    cand = Candidate("static-u8", ("start", False))  # type: ignore[arg-type]

    def probe(floats: set[str]) -> Any:
        return (ALL - floats, False)

    def rebuild(floats: set[str]) -> Any:
        return (ALL - floats, True)

    res = cost_aware_precision(
        cand, probe=probe, rebuild=rebuild, scorer=scorer,  # type: ignore[arg-type]
        op_of=dict.fromkeys(NODES, "Conv"), macs={n: w for n, (w, _) in NODES.items()},
        islands=lambda m, f: [], deadline=Deadline(60),
    )  # fmt: skip
    return cand, res


def test_order_is_noise_per_work_and_the_longest_prefix_within_budget_is_kept():
    # per-MAC order: a (1e-5), e (3e-5), b (4e-5), c (2e-4), d (4e-4); cumulative noise
    # 0.001, 0.004, 0.008, 0.010, 0.030: a budget of 0.0085 keeps a, e, b int8
    cand, res = _run(_Scorer(0.0085))
    assert cand.model == (frozenset({"a", "e", "b"}), True)
    assert set(res["kept_float"]) == {"c", "d"}
    assert cand.exclude == {"c", "d"}
    assert res["int8_work_share"] == round(300 / 360, 3)
    assert res["isolated_noise"][0]["node"] == "d"  # the noisiest first in the report


def test_rebuilt_model_that_misses_steps_back():
    # the rebuilt model carries extra error: the prefix of 3 misses once rebuilt, 2 holds
    cand, res = _run(_Scorer(0.0085, rebuilt_penalty=0.002))
    assert cand.model == (frozenset({"a", "e"}), True), res
    assert "failed" not in res


def test_nothing_fits_is_a_clear_failure():
    cand, res = _run(_Scorer(0.0005))
    assert "failed" in res and cand.model == ("start", False)


def test_split_must_hold_on_the_confirmation_feeds_too():
    """The prefix of 3 holds on the check feeds; feeds that took no part in the search
    (here: a stricter stand-in) reject it, and the search steps back to 2."""
    cand = Candidate("static-u8", ("start", False))  # type: ignore[arg-type]
    res = cost_aware_precision(
        cand, probe=lambda f: (ALL - f, False), rebuild=lambda f: (ALL - f, True),
        scorer=_Scorer(0.0085), op_of=dict.fromkeys(NODES, "Conv"),  # type: ignore[arg-type]
        macs={n: w for n, (w, _) in NODES.items()}, islands=lambda m, f: [],
        deadline=Deadline(60), confirm=_Scorer(0.005),  # type: ignore[arg-type]
    )  # fmt: skip
    assert cand.model == (frozenset({"a", "e"}), True), res
    assert cand.notes["confirmed"]["ok"] is True


def test_non_compute_nodes_follow_the_compute_nodes_that_feed_them():
    """conv1 -> relu -> conv2 -> add(conv2, relu) -> relu -> pool -> gemm: the Add and the
    pool are fed by both convs (through Relu/Add, which do no work) and not by the Gemm."""
    from graphopt_plugins.quantization.passes import attached_nodes
    from onnx import helper

    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="skip"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Gemm", ["p", "Wf"], ["y"], name="fc"),
        helper.make_node("Softmax", ["y"], ["z"], name="soft"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    op_of = {n: "x" for n in ("conv1", "conv2", "skip", "pool", "fc", "soft")}
    got = attached_nodes(model, op_of, {"conv1": 10, "conv2": 10, "fc": 1})
    assert got == {"conv1": {"skip", "pool"}, "conv2": {"skip", "pool"}, "fc": {"soft"}}


def test_output_first_order_wins_when_scattered_int8_nodes_fall_back_to_float():
    """Chain a -> b -> c -> d -> e where an int8 node needs an int8 successor (else it is a
    float island, as onnxruntime leaves a QDQ Conv whose output is not quantized). The
    error-per-work prefix {a, e, b, c} collapses to {e} (100 MACs); output-first keeps
    {e, d, c} (160 MACs, noise 0.025) and wins."""
    chain = ["a", "b", "c", "d", "e"]

    def islands(m: Any, floats: set[str]) -> list[str]:
        int8 = m[0]
        return [n for i, n in enumerate(chain[:-1]) if n in int8 and chain[i + 1] not in int8]

    cand = Candidate("static-u8", ("start", False))  # type: ignore[arg-type]
    res = cost_aware_precision(
        cand, probe=lambda f: (ALL - f, False), rebuild=lambda f: (ALL - f, True),
        scorer=_Scorer(0.025), op_of=dict.fromkeys(chain, "Conv"),  # type: ignore[arg-type]
        macs={n: w for n, (w, _) in NODES.items()}, islands=islands,
        deadline=Deadline(60),
    )  # fmt: skip
    assert res["order"] == "output-first", res
    assert res["orders_int8_work_share"]["error-per-work"] == round(100 / 360, 3)
    assert cand.model == (frozenset({"c", "d", "e"}), True)
    assert res["int8_work_share"] == round(160 / 360, 3)
    assert set(res["kept_float"]) == {"a", "b"}
