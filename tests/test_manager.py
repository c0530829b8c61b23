"""The pass manager: commit, rollback, reproducers, failures, budgets, exit codes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt import ir as gir
from graphopt.errors import ExitCode, UsageError
from graphopt.testing import op_types

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CNN = FIXTURES / "cnn.onnx"
T = graphopt.Tolerance
BUILTINS = ["cleanup", "fusion", "substitution", "pruning", "quantization"]


def _scale_weights(model: ir.Model, factor: float) -> None:
    """Replace (never mutate) the first Conv's weight by weight * factor."""
    for node in model.graph:
        if node.op_type == "Conv":
            w = node.inputs[1]
            arr = w.const_value.numpy() * np.float32(factor)
            w.const_value = ir.tensor(arr.astype(np.float32), name=w.name)
            return


def make_pass(name, tolerance=T.APPROXIMATE, factor=None, *, body=None, level=None, **attrs):
    def run(self, model, ctx):
        if body is not None:
            return body(self, model, ctx)
        _scale_weights(model, factor)
        return graphopt.PassResult(True, {"scaled": 1})

    ns = {"name": name, "summary": name, "tolerance": tolerance, "run": run, "level": level}
    ns.update(attrs)
    return type(name.replace(".", "_").replace("-", "_"), (graphopt.Pass,), ns)


class Plugin:
    def __init__(self, *classes):
        self.classes = classes
        self.__name__ = "testplugin"

    @graphopt.hookimpl
    def graphopt_register_passes(self, register):
        for c in self.classes:
            register(c)


def opt(pipeline, *classes, model=CNN, **kw):
    kw.setdefault("registry", None)
    return graphopt.optimize(
        model,
        pipeline=pipeline,
        plugins=[Plugin(*classes)],
        disable_plugins=BUILTINS,
        **kw,
    )


def statuses(result):
    return [(p.name, p.status) for p in result.report.passes]


def test_commit_and_rollback_by_tolerance():
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    tiny_exact = make_pass("t.tiny-exact", T.EXACT, 1 + 1e-6)
    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    r = opt("t.tiny-exact,t.big,t.tiny", tiny, tiny_exact, big)
    assert statuses(r) == [
        ("t.tiny-exact", "rolled-back"),
        ("t.big", "rolled-back"),
        ("t.tiny", "applied"),
    ]
    assert "EXACT pass must not change outputs" in r.report.passes[0].reason
    assert "exceeds" in r.report.passes[1].reason
    assert r.report.passes[1].metrics["logits"]["max_abs"] > 1e-3
    assert r.report.passes[2].stats == {"scaled": 1}
    assert r.report.final["status"] == "ok"
    assert r.exit_code == ExitCode.OK


def test_rollback_copies_no_weight_bytes_and_never_touches_the_input():
    original = gir.load(CNN)
    before = gir.to_proto(original).SerializeToString()
    tensors = {n: v.const_value for n, v in original.graph.initializers.items()}
    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    r = opt("t.big", big, model=original)
    assert statuses(r) == [("t.big", "rolled-back")]
    # the result shares every weight buffer with the input: nothing was copied
    for name, value in r.model.graph.initializers.items():
        assert value.const_value is tensors[name]
    assert gir.to_proto(original).SerializeToString() == before


def test_raising_and_broken_passes_are_contained_and_the_run_goes_on(tmp_path):
    def boom(self, model, ctx):
        raise RuntimeError("kaboom")

    def not_a_result(self, model, ctx):
        return {"modified": True}

    def rename_output(self, model, ctx):
        model.graph.outputs[0].name = "renamed"
        return graphopt.PassResult(True)

    def dangling(self, model, ctx):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(relu, safe=False)
        return graphopt.PassResult(True)

    passes = [
        make_pass("t.boom", body=boom),
        make_pass("t.dict", body=not_a_result),
        make_pass("t.rename", body=rename_output),
        make_pass("t.dangling", body=dangling),
        make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6),
    ]
    r = opt("t.boom,t.dict,t.rename,t.dangling,t.tiny", *passes, repro_dir=tmp_path / "repro")
    assert statuses(r) == [
        ("t.boom", "failed"),
        ("t.dict", "failed"),
        ("t.rename", "rolled-back"),
        ("t.dangling", "rolled-back"),
        ("t.tiny", "applied"),
    ]
    rec = r.report.passes
    assert "RuntimeError: kaboom" in rec[0].reason
    assert "testplugin" in rec[0].plugin
    assert "not graphopt.PassResult" in rec[1].reason
    assert "inputs/outputs changed" in rec[2].reason
    assert rec[3].reason.startswith("ONNX checker")
    assert r.exit_code == ExitCode.OK
    assert r.report.final["status"] == "ok"


def test_reproducer_folder_reproduces_the_failure(tmp_path):
    big = make_pass("t.big", T.APPROXIMATE, 1.5, options={"k": graphopt.Option(int, 1)})
    r = opt("t.big{k=2}", big, repro_dir=tmp_path / "repro", seed=7)
    folder = Path(r.report.passes[0].repro)
    assert folder.is_dir()
    assert (folder / "pipeline.txt").read_text().strip() == "t.big{k=2}"
    assert "exceeds" in (folder / "reason.txt").read_text()
    repro_model = onnx.load(folder / "model.onnx")
    assert repro_model.SerializeToString() == gir.to_proto(gir.load(CNN)).SerializeToString()
    again = opt(
        (folder / "pipeline.txt").read_text().strip(),
        big,
        model=folder / "model.onnx",
        inputs=folder / "inputs.npz",
    )
    assert statuses(again) == [("t.big", "rolled-back")]
    assert again.report.passes[0].metrics == r.report.passes[0].metrics


def test_lying_no_op_is_discarded():
    def lie(self, model, ctx):
        _scale_weights(model, 3.0)
        return graphopt.PassResult(False)

    r = opt("t.lie", make_pass("t.lie", body=lie))
    assert statuses(r) == [("t.lie", "no-op")]
    assert r.report.final["metrics"]["logits"]["max_abs"] == 0.0


def test_faithful_no_op_hands_its_copy_to_the_next_pass(monkeypatch):
    clones = {"n": 0}
    real_clone = ir.Model.clone

    def counting_clone(self):
        clones["n"] += 1
        return real_clone(self)

    monkeypatch.setattr(ir.Model, "clone", counting_clone)
    seen = []

    def look(self, model, ctx):
        seen.append(id(model))
        return graphopt.PassResult(False)

    faithful = [make_pass(f"t.f{i}", body=look, faithful_noop=True) for i in range(3)]
    opt("t.f0,t.f1,t.f2", *faithful, validate="none")
    # the model optimize() loaded from the path, unvalidated, is worked on in place: its
    # bytes from the load check restore it if a pass fails
    assert len(set(seen)) == 1
    assert clones["n"] == 0
    # validated, the validator keeps the model it was given: the manager works on one
    # copy, in place too (the reference run's bytes restore it)
    seen.clear()
    opt("t.f0,t.f1,t.f2", *faithful)
    assert len(set(seen)) == 1
    assert clones["n"] == 1

    seen.clear()
    plain = [make_pass(f"t.p{i}", body=look) for i in range(3)]
    opt("t.p0,t.p1,t.p2", *plain, validate="none")
    assert len(set(seen)) == 3  # an undeclared pass always gets a fresh copy


def test_a_model_the_caller_passed_is_never_consumed(tmp_path):
    def scale(self, model, ctx):
        _scale_weights(model, 2.0)
        return graphopt.PassResult(True)

    proto = onnx.load(str(CNN))
    before = proto.SerializeToString()
    model = gir.load(CNN)
    fingerprint = gir.fingerprint(model)
    for given in (proto, model):
        r = opt("t.scale", make_pass("t.scale", body=scale), model=given, validate="none")
        assert statuses(r) == [("t.scale", "applied")]
    assert proto.SerializeToString() == before
    assert gir.fingerprint(model) == fingerprint


def test_a_lie_after_a_faithful_no_op_is_still_discarded():
    def lie(self, model, ctx):
        _scale_weights(model, 3.0)
        return graphopt.PassResult(False)

    def nothing(self, model, ctx):
        return graphopt.PassResult(False)

    r = opt(
        "t.quiet,t.lie",
        make_pass("t.quiet", body=nothing, faithful_noop=True),
        make_pass("t.lie", body=lie),
    )
    assert statuses(r) == [("t.quiet", "no-op"), ("t.lie", "no-op")]
    assert r.report.final["metrics"]["logits"]["max_abs"] == 0.0


@pytest.mark.parametrize(("applies", "rounds"), [(0, 1), (1, 2), (2, 3), (10, 3)])
def test_a_preset_runs_again_until_a_round_changes_nothing(applies, rounds):
    calls = {"n": 0}

    def touch(self, model, ctx):
        calls["n"] += 1
        if calls["n"] > applies:
            return graphopt.PassResult(False)
        model.graph.doc_string = f"touched {calls['n']}"  # harmless, but a change
        return graphopt.PassResult(True)

    r = opt(None, make_pass("t.touch", body=touch, level=1), level=1)
    assert [(p.name, p.round) for p in r.report.passes] == [
        ("t.touch", k) for k in range(1, rounds + 1)
    ]
    assert calls["n"] == rounds
    table = r.report.table()
    if rounds == 2:  # a quiet later round is one summary line, not a row per pass
        assert "t.touch (round 2)" not in table
        assert "round 2: 1 passes run again" in table and "fixpoint" in table
    if applies >= 3:  # an applied pass of a later round keeps its row
        assert "t.touch (round 3)" in table


def test_a_faithful_no_op_is_not_rerun_on_the_same_model():
    calls = {"n": 0}

    def touch_once(self, model, ctx):
        calls["n"] += 1
        if calls["n"] > 1:
            return graphopt.PassResult(False)
        model.graph.doc_string = "touched"
        return graphopt.PassResult(True)

    def nothing(self, model, ctx):
        return graphopt.PassResult(False)

    r = opt(
        None,
        make_pass("t.a", body=nothing, level=1, order=1, faithful_noop=True),
        make_pass("t.b", body=touch_once, level=1, order=2),
        make_pass("t.c", body=nothing, level=1, order=3, faithful_noop=True),
        level=1,
    )
    # round 2: t.a sees a changed model, t.c the model it already found nothing in
    assert [(p.name, p.round) for p in r.report.passes] == [
        ("t.a", 1), ("t.b", 1), ("t.c", 1), ("t.a", 2), ("t.b", 2),
    ]  # fmt: skip


def test_a_faithful_no_op_is_not_rerun_at_another_position_on_the_same_model():
    calls = {"n": 0}

    def nothing(self, model, ctx):
        calls["n"] += 1
        return graphopt.PassResult(False)

    # cleanup passes sit at two positions of a preset; nothing changes in between
    quiet = make_pass("t.quiet", body=nothing, level=1, order=(1, 900), faithful_noop=True)
    other = make_pass("t.other", body=nothing, level=1, order=500)
    r = opt(None, quiet, other, level=1)
    assert [p.name for p in r.report.passes] == ["t.quiet", "t.other"]
    assert calls["n"] == 2


def test_a_named_pipeline_and_a_failed_pass_run_once():
    calls = {"n": 0}

    def touch(self, model, ctx):
        calls["n"] += 1
        model.graph.doc_string = f"touched {calls['n']}"
        return graphopt.PassResult(True)

    def crash(self, model, ctx):
        raise RuntimeError("boom")

    r = opt("t.touch", make_pass("t.touch", body=touch, level=1))
    assert [p.round for p in r.report.passes] == [1]
    calls["n"] = 0
    r = opt(
        None,
        make_pass("t.touch", body=touch, level=1, order=1),
        make_pass("t.crash", body=crash, level=1, order=2),
        level=1,
    )
    assert [(p.name, p.round, p.status) for p in r.report.passes] == [
        ("t.touch", 1, "applied"), ("t.crash", 1, "failed"),
        ("t.touch", 2, "applied"), ("t.touch", 3, "applied"),
    ]  # fmt: skip


def test_timeout_is_recorded_as_failed():
    def slow(self, model, ctx):
        time.sleep(5)
        return graphopt.PassResult(False)

    start = time.perf_counter()
    r = opt(
        "t.slow,t.tiny",
        make_pass("t.slow", body=slow),
        make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6),
        pass_timeout=0.3,
    )
    assert time.perf_counter() - start < 4
    assert statuses(r) == [("t.slow", "failed"), ("t.tiny", "applied")]
    assert "timed out" in r.report.passes[0].reason


def test_on_fail_stop_and_strict_set_exit_codes():
    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    r = opt("t.big,t.tiny", big, tiny, on_fail="stop")
    assert statuses(r) == [("t.big", "rolled-back"), ("t.tiny", "skipped")]
    assert "stopped after t.big" in r.report.passes[1].reason
    assert r.exit_code == ExitCode.BUDGET_NOT_MET

    r = opt("t.big,t.tiny", big, tiny, strict=True)
    assert statuses(r) == [("t.big", "rolled-back"), ("t.tiny", "applied")]
    assert r.exit_code == ExitCode.BUDGET_NOT_MET

    def boom(self, model, ctx):
        raise ValueError("x")

    r = opt("t.boom", make_pass("t.boom", body=boom), strict=True)
    assert r.exit_code == ExitCode.PLUGIN_ERROR


def test_lossy_passes_obey_the_budget_against_the_original():
    lossy = make_pass("t.lossy", T.LOSSY, 1.05)
    with pytest.raises(UsageError, match="needs a --budget"):
        opt("t.lossy", lossy)
    r = opt("t.lossy", lossy, budget="cosine>=0.99")
    assert statuses(r) == [("t.lossy", "applied")]
    assert r.report.final["status"] == "ok"
    r = opt("t.lossy", lossy, budget="maxabs<=1e-6")
    assert statuses(r) == [("t.lossy", "rolled-back")]
    assert "budget broken: maxabs=" in r.report.passes[0].reason
    # error cannot creep: each lossy step is measured against the original, so a second
    # identical step (error ~2x the first vs the original) breaks a budget of 1.5x the first
    e1 = r_first_maxabs = (
        opt("t.lossy", lossy, budget="cosine>=0.5").report.passes[0].metrics["logits"]["max_abs"]
    )
    assert r_first_maxabs > 0
    r = opt(
        "t.lossy,t.lossy2",
        lossy,
        make_pass("t.lossy2", T.LOSSY, 1.05),
        budget=f"maxabs<={1.5 * e1}",
    )
    assert statuses(r) == [("t.lossy", "applied"), ("t.lossy2", "rolled-back")]


def test_a_budget_the_inputs_cannot_fail_is_warned():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    conv = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
            [w],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    lossy = make_pass("t.lossy", T.LOSSY, 1.001)
    images = [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)} for _ in range(4)]
    # the same image 4 times: its output, returned for any input, meets any budget
    r = opt("t.lossy", lossy, model=conv, budget="cosine>=0.99", inputs=[images[0]] * 4)
    (w,) = [w for w in r.report.warnings if "ignores its input" in w]
    assert "cosine>=0.99" in w and "4 validation inputs" in w and "cosine 1" in w
    r = opt("t.lossy", lossy, model=conv, budget="cosine>=0.99", inputs=images)
    assert r.report.passes[0].status == "applied"
    assert not [w for w in r.report.warnings if "ignores its input" in w]


def test_a_lossy_pass_over_the_budget_gets_one_more_cautious_try():
    gentle = make_pass("t.lossy", T.LOSSY, 1.0001)  # the cautious copy: a tiny change
    harsh = make_pass("t.lossy", T.LOSSY, 1.5, safer=lambda self: gentle())
    r = opt("t.lossy", harsh, budget="cosine>=0.9999")
    assert statuses(r) == [("t.lossy", "rolled-back"), ("t.lossy", "applied")]
    assert r.report.passes[0].reason.endswith("; retried more cautiously")
    assert r.report.final["status"] == "ok"
    # once only: a retry that breaks the budget too is given up, and nothing loops
    stubborn = make_pass("t.lossy", T.LOSSY, 1.5, safer=lambda self: type(self)())
    r = opt("t.lossy", stubborn, budget="cosine>=0.9999")
    assert statuses(r) == [("t.lossy", "rolled-back"), ("t.lossy", "rolled-back")]
    # --on-fail stop: no second attempt
    r = opt("t.lossy", harsh, budget="cosine>=0.9999", on_fail="stop")
    assert statuses(r) == [("t.lossy", "rolled-back")]
    # a pass without safer() (the default) is not retried
    r = opt("t.lossy", make_pass("t.lossy", T.LOSSY, 1.5), budget="cosine>=0.9999")
    assert statuses(r) == [("t.lossy", "rolled-back")]


def test_level3_needs_a_budget():
    with pytest.raises(UsageError, match="-O3"):
        graphopt.optimize(CNN, level=3, disable_plugins=BUILTINS)


def test_validate_end_finds_the_culprit_by_rerunning_each():
    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    r = opt("t.tiny,t.big", tiny, big, validate="end")
    assert statuses(r) == [("t.tiny", "applied"), ("t.big", "rolled-back")]
    assert r.report.final["status"] == "ok"
    assert "re-validated" in r.report.final["note"]


def test_validate_none_still_checks_structure():
    def dangling(self, model, ctx):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(relu, safe=False)
        return graphopt.PassResult(True)

    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    r = opt("t.dangling,t.big", make_pass("t.dangling", body=dangling), big, validate="none")
    assert statuses(r) == [("t.dangling", "rolled-back"), ("t.big", "applied")]
    assert r.report.final["status"] == "not-validated"


def test_requirements_skip_in_presets_and_error_when_named():
    needs_17 = make_pass(
        "t.new", T.APPROXIMATE, 1 + 1e-6, level=1, requires=graphopt.Requirements(min_opset=99)
    )
    needs_data = make_pass(
        "t.data", T.APPROXIMATE, 1 + 1e-6, level=1, requires=graphopt.Requirements(calibration=True)
    )
    r = graphopt.optimize(
        CNN, level=1, plugins=[Plugin(needs_17, needs_data)], disable_plugins=BUILTINS
    )
    got = {p.name: (p.status, p.reason) for p in r.report.passes}
    assert got["t.new"] == ("skipped", "needs opset >= 99, model has 17")
    assert got["t.data"][0] == "skipped" and "--calibration" in got["t.data"][1]
    with pytest.raises(UsageError, match="needs calibration data"):
        opt("t.data", needs_data)
    feeds = [{"input": np.zeros((1, 3, 32, 32), np.float32)}]
    r = opt("t.data", needs_data, calibration=feeds)
    assert statuses(r) == [("t.data", "applied")]


def test_new_nodes_are_tagged_with_their_pass():
    def add_identity(self, model, ctx):
        out = model.graph.outputs[0]
        producer = out.producer()
        new_val = ir.Value(name="pre_logits", shape=out.shape, type=out.type)
        producer.outputs[0].name = "pre_logits_tmp"
        node = ir.Node("", "Identity", [producer.outputs[0]], name="tagged_identity")
        node.metadata_props["graphopt.pass"] = "stale"  # as a rewriter copying old metadata
        model.graph.append(node)
        node.outputs[0].name = "logits"
        node.outputs[0].shape, node.outputs[0].type = out.shape, out.type
        model.graph.outputs[0] = node.outputs[0]
        del new_val
        return graphopt.PassResult(True)

    r = opt("t.ident", make_pass("t.ident", T.EXACT, body=add_identity))
    assert statuses(r) == [("t.ident", "applied")]
    tagged = [n for n in r.model.graph if n.name == "tagged_identity"]
    assert tagged and tagged[0].metadata_props["graphopt.pass"] == "t.ident"
    assert op_types(r.model)[-1] == "Identity"


def test_optimize_accepts_proto_and_ir_and_leaves_them_alone():
    proto = onnx.load(CNN)
    snapshot = proto.SerializeToString()
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    r1 = opt("t.tiny", tiny, model=proto)
    assert proto.SerializeToString() == snapshot
    model = ir.serde.deserialize_model(proto)
    r2 = opt("t.tiny", tiny, model=model)
    assert (
        gir.to_proto(model).SerializeToString()
        == gir.to_proto(ir.serde.deserialize_model(proto)).SerializeToString()
    )
    assert isinstance(r1.model_proto, onnx.ModelProto)
    assert r1.model_proto.SerializeToString() == r2.model_proto.SerializeToString()


def test_save_is_atomic_and_round_trips(tmp_path):
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    r = opt("t.tiny", tiny)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old content")
    r.save(out)
    assert onnx.load(out).SerializeToString() == r.model_proto.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert r.report.output == str(out)
    # the mode of a new file (the temporary file it was renamed from is 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_passes_after_a_lossy_one_are_held_to_the_lossy_model():
    # an APPROXIMATE pass after a LOSSY one is compared with the committed (lossy) model,
    # not with the original, which is already further away than its tolerance
    lossy = make_pass("t.lossy", T.LOSSY, 1.05)
    tiny = make_pass("t.tiny", T.APPROXIMATE, 1 + 1e-6)
    big = make_pass("t.big", T.APPROXIMATE, 1.5)
    r = opt("t.lossy,t.tiny,t.big", lossy, tiny, big, budget="cosine>=0.5")
    assert statuses(r) == [("t.lossy", "applied"), ("t.tiny", "applied"), ("t.big", "rolled-back")]
    assert r.report.final["status"] == "ok"


def test_exact_passes_after_a_lossy_one_compare_plain_runs(monkeypatch):
    # onnxruntime's optimized (deployed) kernels may differ in the last bits between two
    # sessions of the same graph; an EXACT pass after a LOSSY one is compared run as
    # written, so that noise cannot roll it back -- and a real change still does
    from graphopt.validate import Runner

    real_run = Runner.run
    jitter = {"n": 0}

    def run(self, model, feeds):
        outs = real_run(self, model, feeds)
        if self.optimize:  # the deployed runner: a different last bit each session
            jitter["n"] += 1
            outs = [{k: v * np.float32(1 + 1e-7 * jitter["n"]) for k, v in o.items()} for o in outs]
        return outs

    monkeypatch.setattr(Runner, "run", run)

    def rename(self, model, ctx):
        model.graph.doc_string = "renamed"
        return graphopt.PassResult(True)

    lossy = make_pass("t.lossy", T.LOSSY, 1.05)
    same = make_pass("t.same", T.EXACT, body=rename)
    wrong = make_pass("t.wrong", T.EXACT, 1 + 1e-3)
    r = opt("t.lossy,t.same,t.wrong,t.same", lossy, same, wrong, budget="cosine>=0.5")
    assert statuses(r) == [
        ("t.lossy", "applied"), ("t.same", "applied"), ("t.wrong", "rolled-back"),
        ("t.same", "applied"),
    ]  # fmt: skip
    assert jitter["n"] >= 1


def test_a_pass_sees_the_committed_model_serialized_and_only_while_it_runs():
    seen = []

    def look(self, model, ctx):
        seen.append((ctx.model_bytes, gir.to_proto(model).SerializeToString()))
        return graphopt.PassResult(False)

    def scale(self, model, ctx):  # and a new node, which the manager tags
        _scale_weights(model, 1 + 1e-6)
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.append(ir.Node("", "Identity", [relu.outputs[0]], name="extra"))
        return graphopt.PassResult(True)

    ctx_holder = []

    def keep(self, model, ctx):
        ctx_holder.append(ctx)
        return graphopt.PassResult(False)

    r = opt(
        "t.look1,t.scale,t.look2,t.keep",
        make_pass("t.look1", body=look, faithful_noop=True),
        make_pass("t.scale", body=scale),
        make_pass("t.look2", body=look, faithful_noop=True),
        make_pass("t.keep", body=keep, faithful_noop=True),
    )
    assert statuses(r)[1] == ("t.scale", "applied")
    (first, model_then), (second, model_now) = seen
    assert first == model_then  # the input, as the validator's reference run had it
    assert second == model_now  # the committed model, exactly as handed to the pass
    assert b"extra" in second and b"graphopt.pass" in second  # its new node, tagged
    assert ctx_holder[0].model_bytes is None  # cleared once the pass has run


def test_full_collections_are_rarer_during_optimize_and_restored_after():
    """graphopt/_gc.py: a full GC walks every IR object; optimize() raises only the
    full-collection threshold while it runs, and puts the caller's back."""
    import gc

    from graphopt import _gc

    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []

    def spy(self, model, ctx):
        seen.append(gc.get_threshold())
        return graphopt.PassResult(False)

    opt("t.spy", make_pass("t.spy", body=spy), validate="none")
    assert seen == [(before[0], before[1], _gc.FULL_EVERY)]
    assert gc.get_threshold() == before
    with _gc.fewer_full_collections():  # nested and concurrent users share one change
        with _gc.fewer_full_collections():
            assert gc.get_threshold()[2] == _gc.FULL_EVERY
        assert gc.get_threshold()[2] == _gc.FULL_EVERY
    assert gc.get_threshold() == before
    gc.set_threshold(0)  # a program that turned the collector off keeps it off
    try:
        with _gc.fewer_full_collections():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


def _breaks(kind):
    """A faithful pass that changes the model, then fails in one of the ways the manager
    contains."""

    def body(self, model, ctx):
        _scale_weights(model, 100.0)
        model.graph.append(ir.Node("", "Identity", [model.graph.inputs[0]], name="stray"))
        if kind == "raises":
            raise RuntimeError("half-way")
        if kind == "times out":
            time.sleep(1.0)
            _scale_weights(model, 7.0)  # after the manager gave up on it
            return graphopt.PassResult(True)
        if kind == "returns junk":
            return "done"
        model.graph.outputs[0].name = "renamed"  # "rolled back": the IO check fails
        return graphopt.PassResult(True)

    return make_pass("t.break", body=body, faithful_noop=True)


@pytest.mark.parametrize("kind", ["raises", "times out", "returns junk", "rolled back"])
@pytest.mark.parametrize("validate", ["none", "each"])
def test_a_faithful_pass_in_place_that_fails_leaves_the_committed_model(
    kind, validate, monkeypatch
):
    """After a commit the manager has the model's bytes; a faithful pass then works on the
    committed model itself (no clone), and any failure restores it from those bytes."""
    clones = {"n": 0}
    real_clone = ir.Model.clone

    def counting_clone(self):
        clones["n"] += 1
        return real_clone(self)

    scale = make_pass("t.scale", T.APPROXIMATE, 1 + 1e-6)
    want = opt("t.scale", scale, validate=validate)
    monkeypatch.setattr(ir.Model, "clone", counting_clone)
    got = opt(
        "t.scale,t.break,t.scale2",
        scale,
        _breaks(kind),
        make_pass("t.scale2", T.APPROXIMATE, 1 + 1e-6, faithful_noop=True),
        validate=validate,
        pass_timeout=0.3,
    )
    assert statuses(got)[:2] == [
        ("t.scale", "applied"),
        ("t.break", "rolled-back" if kind == "rolled back" else "failed"),
    ]
    # t.scale2 ran on the restored model: the committed one, scaled once more
    assert statuses(got)[2] == ("t.scale2", "applied")
    assert "stray" not in {n.name for n in got.model.graph}
    w_want = next(n for n in want.model.graph if n.op_type == "Conv").inputs[1].const_value.numpy()
    w_got = next(n for n in got.model.graph if n.op_type == "Conv").inputs[1].const_value.numpy()
    np.testing.assert_allclose(w_got, w_want * np.float32(1 + 1e-6), rtol=1e-6)
    # copies: t.scale's (it is not faithful) and, validated, the manager's own copy of
    # the model it was given; t.break and t.scale2 work in place
    assert clones["n"] == (1 if validate == "none" else 2)


def test_drop_dead_uses_detaches_nodes_no_longer_in_the_model():
    model = gir.load(CNN)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    x = relu.inputs[0]
    extra = ir.Node("", "Neg", [x], name="gone")
    model.graph.insert_after(relu, extra)
    assert len(x.uses()) == 2
    model.graph.remove(extra, safe=False)  # what a library may do: its input stays listed
    assert len(x.uses()) == 2
    assert gir.drop_dead_uses(model) == 1
    assert [u.node for u in x.uses()] == [relu]
    assert gir.drop_dead_uses(model) == 0


def test_the_unvalidated_load_check_runs_beside_the_passes_and_its_verdict_holds(monkeypatch):
    """--validate none: onnxruntime loads the model in another thread while the passes
    work; a model it refuses is still an InputError, raised before anything is returned."""
    import threading

    from graphopt.errors import InputError
    from graphopt.validate import Runner

    threads, ran = [], []
    real_session = Runner.session

    def session(self, model):
        threads.append(threading.current_thread().name)
        return real_session(self, model)

    def mark(self, model, ctx):
        ran.append(1)
        return graphopt.PassResult(False)

    monkeypatch.setattr(Runner, "session", session)
    opt("t.mark", make_pass("t.mark", body=mark), validate="none")
    assert threads == ["graphopt-load-check"] and ran == [1]
    # a weight-heavy model is checked first, in the caller's thread: onnxruntime's copy
    # of its weights is not held while the passes run
    monkeypatch.setattr(graphopt.api, "SNAPSHOT_BYTES", 0)
    opt("t.mark", make_pass("t.mark", body=mark), validate="none")
    assert threads[1] == threading.current_thread().name and ran == [1, 1]
    monkeypatch.undo()

    def refuse(self, model):
        raise RuntimeError("Fatal error: acme:Foo(-1) is not a registered function/op")

    monkeypatch.setattr(Runner, "session", refuse)
    with pytest.raises(InputError, match=r"onnxruntime cannot run .*acme:Foo"):
        opt("t.mark", make_pass("t.mark", body=mark), validate="none")


@pytest.mark.parametrize("validate", ["none", "each"])
def test_what_an_in_place_no_op_leaves_behind_never_reaches_the_result(validate):
    """A faithful no-op may annotate (infer types); in place, that lands on the committed
    model. Without a later commit no check saw it, so the result is the checked model
    (ONNX test_loop16_seq_none: an inferred tensor type on a sequence value)."""

    def annotate(self, model, ctx):
        model.graph.doc_string = "unchecked"
        return graphopt.PassResult(False)

    r = opt(
        "t.scale,t.note",
        make_pass("t.scale", T.APPROXIMATE, 1 + 1e-6),
        make_pass("t.note", body=annotate, faithful_noop=True),
        validate=validate,
    )
    assert statuses(r) == [("t.scale", "applied"), ("t.note", "no-op")]
    assert r.model.graph.doc_string != "unchecked"
    assert r.model_proto.graph.doc_string != "unchecked"
