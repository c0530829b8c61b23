"""Fast, offline tests of tools/benchmark.py: metrics, round-robin timing, the report.

No network and no corpus: tiny hand-made arrays and the fixtures in ``fixtures/``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import benchmark as bm  # noqa: E402

CNN = ROOT / "fixtures" / "cnn.onnx"

# ------------------------------------------------------------------------------ metrics


def _onehot(indices: list[int], classes: int) -> np.ndarray:
    p = np.full((len(indices), classes), 0.01, dtype=np.float32)
    for t, i in enumerate(indices):
        p[t, i] = 0.9
    return p


def test_ctc_characters_like_rapidocr():
    chars = bm.ctc_characters("a\nb\nc")
    assert chars == ["blank", "a", "b", "c", " "]


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    chars = bm.ctc_characters("a\nb\nc")
    # a a | blank | a | b b | space | c | blank blank
    probs = _onehot([1, 1, 0, 1, 2, 2, 4, 3, 0, 0], len(chars))
    assert bm.ctc_greedy_decode(probs, chars) == "aab c"
    # batch axis of one, as the model outputs it
    assert bm.ctc_greedy_decode(probs[None], chars) == "aab c"
    # all blanks: empty text
    assert bm.ctc_greedy_decode(_onehot([0, 0, 0], len(chars)), chars) == ""
    with pytest.raises(ValueError):
        bm.ctc_greedy_decode(np.stack([probs, probs]), chars)


def test_text_agreement_counts_identical_decodes():
    chars = bm.ctc_characters("a\nb")
    ref = [_onehot([1, 2], 4), _onehot([2, 2], 4)]
    # second sample: noise that keeps the argmax; third-party change of one step
    same = [ref[0] + 0.01, ref[1].copy()]
    changed = [ref[0], _onehot([2, 1], 4)]
    assert bm.text_agreement(ref, same, chars) == 1.0
    assert bm.text_agreement(ref, changed, chars) == 0.5


def test_mask_iou():
    a = np.zeros((1, 1, 4, 4), np.float32)
    b = np.zeros((1, 1, 4, 4), np.float32)
    assert bm.mask_iou(a, b) == 1.0  # both empty
    a[0, 0, :2, :2] = 0.9  # 4 pixels
    b[0, 0, :2, :3] = 0.8  # 6 pixels, 4 shared
    assert bm.mask_iou(a, b) == pytest.approx(4 / 6)
    # threshold is strict: exactly 0.3 is background
    c = np.full((4, 4), 0.3, np.float32)
    assert bm.mask_iou(c, np.zeros((4, 4))) == 1.0
    assert bm.mask_iou(c, c, threshold=0.2) == 1.0
    assert bm.mean_iou([a, a], [b, a]) == pytest.approx((4 / 6 + 1) / 2)


def test_mean_pool_is_mask_aware():
    tokens = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, -50.0]]])  # [1, 3, 2]
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(bm.mean_pool(tokens, mask), [[2.0, 1.0]])
    # changing the padded token does not change the sentence embedding
    other = tokens.copy()
    other[0, 2] = [-7.0, 42.0]
    assert bm.pooled_cosine([tokens], [other], [mask]) == pytest.approx(1.0)
    # but the plain cosine of the token tensors sees the padding
    assert bm.cosine(tokens, other) < 0.99
    flipped = tokens.copy()
    flipped[0, :2] *= -1
    assert bm.pooled_cosine([tokens], [flipped], [mask]) == pytest.approx(-1.0)


def test_cosine_top1_maxabs():
    assert bm.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert bm.cosine(np.zeros(3), np.ones(3)) == 0.0
    assert bm.cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        bm.cosine(np.ones(3), np.ones(4))
    mean, lo = bm.mean_cosine(
        [np.array([1.0, 0.0])] * 2, [np.array([1.0, 0.0]), np.array([0, 1.0])]
    )
    assert (mean, lo) == (pytest.approx(0.5), pytest.approx(0.0))
    refs = [np.array([[0.1, 0.7, 0.2]]), np.array([[[[0.5]], [[0.4]]]])]
    outs = [np.array([[0.1, 0.6, 0.3]]), np.array([[[[0.3]], [[0.6]]]])]
    assert bm.top1_agreement(refs, outs) == 0.5
    assert bm.max_abs_diff(
        [np.array([[0.5]]), np.array([[0.1]])], [np.array([[0.25]]), np.array([[0.2]])]
    ) == pytest.approx(0.25)


def test_count_ops_sees_subgraphs():
    counts = bm.count_ops(ROOT / "fixtures" / "subgraph_if.onnx", ("If", "MatMul", "Relu"))
    assert counts == {"total": 10, "If": 1, "MatMul": 2, "Relu": 1}  # 4 + 2 branches of 3


def test_task_for_and_task_value():
    for model in ("zoo_x", "ppocr_cls", "ppocr_rec", "ppocr_det", "minilm", "silero_vad"):
        assert "|" not in bm.task_for(model).name  # it goes into markdown tables
    assert bm.task_for("zoo_resnet50").kind == "top1"
    assert bm.task_for("ppocr_cls").kind == "top1"
    assert bm.task_for("ppocr_rec").kind == "text"
    assert bm.task_for("ppocr_det").kind == "iou"
    assert bm.task_for("minilm").kind == "pooled"
    vad = bm.task_for("silero_vad")
    assert vad.kind == "maxabs" and not vad.higher_is_better
    tokens = np.ones((1, 3, 2))
    feeds = [{"input_ids": np.zeros((1, 3), np.int64), "attention_mask": np.ones((1, 3))}]
    assert bm.task_value(bm.task_for("minilm"), [tokens], [tokens], feeds) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bm.task_value(bm.task_for("ppocr_rec"), [tokens], [tokens])


def test_one_line():
    try:
        raise AssertionError
    except AssertionError as e:
        msg = bm.one_line(e)
    assert msg.startswith("AssertionError at test_benchmark_tool.py:")
    err = RuntimeError(
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /a/b.onnx "
        "failed:bad | thing\nmore"
    )
    assert bm.one_line(err) == "RuntimeError: bad / thing more"
    long = bm.one_line(ValueError("start " + "x" * 1000 + " the reason"))
    assert len(long) == 240 and long.startswith("ValueError: start") and long.endswith("reason")


# ------------------------------------------------------------------------------ configs


def test_make_configs_and_level_dedupe():
    cfgs = bm.make_configs()
    names = [c.name for c in cfgs]
    assert names[0] == bm.BASELINE
    for n in (
        "onnxsim",
        "onnxslim",
        "qdq-u8",
        "qdq-s8",
        "dynamic-int8",
        "graphopt-O1",
        "graphopt-O2",
        "graphopt-O3",
        bm.FUSION_ORIG,
        bm.FUSION_O1,
    ):
        assert n in names
    by = {c.name: c for c in cfgs}
    assert by["qdq-u8"].options["activation"] == "QUInt8"
    assert by["qdq-s8"].options["activation"] == "QInt8"
    assert by["graphopt-O3"].options == {"level": 3, "budget": "cosine>=0.99", "calibration": True}
    assert by[bm.FUSION_O1].ort_level == by[bm.FUSION_ORIG].ort_level == "disable"
    assert by[bm.FUSION_O1].source == "graphopt-O1"
    assert [c.name for c in bm.make_configs((1,), peers=False, quant=False, control=False)] == [
        bm.BASELINE,
        "graphopt-O1",
        bm.FUSION_ORIG,
        bm.FUSION_O1,
    ]
    assert bm.duplicate_levels({1: "a,b", 2: "a,b", 3: "a,b,c"}) == {2: 1}
    assert bm.duplicate_levels({1: "a", 2: "a", 3: "a"}) == {2: 1, 3: 1}
    assert bm.duplicate_levels({1: "a", 2: "b", 3: "c"}) == {}


def test_run_builder_reports_failures_in_one_line(tmp_path):
    out = bm.run_builder(
        "dynamic",
        {"src": str(tmp_path / "missing.onnx"), "dst": str(tmp_path / "x.onnx")},
        30,
        isolate=False,
    )
    assert out["ok"] is False
    assert "\n" not in out["error"] and out["error"]


# ------------------------------------------------------------------------------ timing


def test_round_robin_rotates_and_counts():
    calls: list[str] = []
    runners = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    ticks = itertools.count()
    times = bm.round_robin(runners, 4, warmup=1, clock=lambda: float(next(ticks)))
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == list("abcbcacababc")  # rotates by one each round
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_round_robin_min_and_max_seconds():
    ticks = itertools.count()
    runners = {"a": lambda: None, "b": lambda: None}
    # each run takes 1 tick; min_seconds pushes past `rounds`, capped by max_rounds
    times = bm.round_robin(
        runners, 2, warmup=0, min_seconds=30, max_rounds=50, clock=lambda: float(next(ticks))
    )
    assert 2 < len(times["a"]) < 50
    ticks = itertools.count()
    times = bm.round_robin(runners, 100, warmup=0, max_seconds=10, clock=lambda: float(next(ticks)))
    assert len(times["a"]) < 100


def test_ratio_stats_is_per_round():
    # drift: everything doubles half-way; per-round ratios stay 0.5 for "fast"
    base = [1.0] * 5 + [2.0] * 5
    times = {"baseline": base, "fast": [b / 2 for b in base], "slow": [b * 3 for b in base]}
    times["ref2"] = [4.0] * 10
    times["vs2"] = [1.0] * 10
    stats = bm.ratio_stats(times, "baseline", {"vs2": "ref2"})
    assert "baseline" not in stats
    assert stats["fast"]["median"] == pytest.approx(0.5)
    assert stats["fast"]["p10"] == pytest.approx(0.5) and stats["fast"]["p90"] == pytest.approx(0.5)
    assert stats["slow"]["median"] == pytest.approx(3.0)
    assert stats["vs2"]["median"] == pytest.approx(0.25)
    assert stats["fast"]["n"] == 10
    lat = bm.latency_ms([0.001, 0.002, 0.003])
    assert lat["p50"] == pytest.approx(2.0)


def test_round_robin_on_fixture_against_itself():
    a = bm.create_session(CNN)
    b = bm.create_session(CNN)
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    runners = {"baseline": lambda: a.run(None, feed), "same": lambda: b.run(None, feed)}
    times = bm.round_robin(runners, 60, warmup=5)
    stats = bm.ratio_stats(times, "baseline")
    # the same model: the per-round ratio is about 1 even on a loaded machine
    assert 0.7 < stats["same"]["median"] < 1.4, stats
    assert stats["same"]["p10"] <= stats["same"]["median"] <= stats["same"]["p90"]
    np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])
    assert bm.main_output_name(a) == "logits"


# ------------------------------------------------------------------------------ report


def _fake_results() -> tuple[list[dict], dict]:
    task = {"name": "top-1 agreement", "kind": "top1", "higher_is_better": True}
    lat = {"p50": 10.0, "p10": 9.5, "p90": 11.0, "n": 30}
    ok = {"status": "ok", "latency_ms": lat, "session_ms": 12.0, "size_bytes": 5 * 2**20}
    res = {
        "model": "zoo_fake",
        "status": "ok",
        "task": task,
        "size_bytes": 5 * 2**20,
        "baseline_ms": lat,
        "rounds": 30,
        "warmup": 3,
        "eval_samples": 32,
        "main_output": "prob",
        "timing_feed": {"data": {"shape": [1, 3, 8, 8], "dtype": "float32"}},
        "load_before": [1.5, 1, 1],
        "load_after": [2.0, 1, 1],
        "configs": [
            {"name": "baseline", **ok, "cosine": 1.0, "cosine_min": 1.0, "task_value": 1.0},
            {
                "name": "onnxsim",
                **ok,
                "ratio": {"median": 0.9, "p10": 0.85, "p90": 0.95},
                "cosine": 0.9999991,
                "cosine_min": 0.99999,
                "task_value": 1.0,
                "optimize_s": 0.5,
            },
            {
                "name": "onnxslim",
                "status": "failed",
                "error": "ValueError: onnxslim cannot handle this model",
            },
            {
                "name": "qdq-u8",
                **ok,
                "ratio": {"median": 0.5, "p10": 0.45, "p90": 0.55},
                "cosine": 0.98,
                "cosine_min": 0.9,
                "task_value": 0.875,
                "optimize_s": 3.0,
                "notes": ["after quant_pre_process (0.4 s)"],
            },
            {
                "name": "graphopt-O1",
                **ok,
                "ratio": {"median": 1.2, "p10": 1.1, "p90": 1.3},
                "cosine": 1.0,
                "cosine_min": 1.0,
                "task_value": 1.0,
                "optimize_s": 1.0,
                "graphopt": {
                    "passes": 20,
                    "counts": {"applied": 3, "no-op": 16, "rolled-back": 1},
                    "rolled_back": [["fuse-bn", "cosine 0.2 < 0.999"]],
                    "nodes": [70, 60],
                    "final": {"status": "ok"},
                },
            },
            {
                "name": "graphopt-O2",
                "status": "same",
                "same_as": "graphopt-O1",
                "notes": ["no -O2 passes registered"],
            },
            {
                "name": "orig@disable",
                **ok,
                "ratio": {"median": 1.4, "p10": 1.3, "p90": 1.5},
                "latency_ms": {**lat, "p50": 14.0},
                "cosine": 1.0,
                "task_value": 1.0,
            },
            {
                "name": "graphopt-O1@disable",
                **ok,
                "ratio": {"median": 0.8, "p10": 0.75, "p90": 0.85},
                "latency_ms": {**lat, "p50": 11.2},
                "cosine": 1.0,
                "task_value": 1.0,
            },
        ],
    }
    broken = {"model": "zoo_broken", "status": "failed", "error": "RuntimeError: baseline fails"}
    meta = {
        "date": "2024-01-01 00:00 UTC",
        "versions": {"graphopt": "0.1.0", "onnxruntime": "1.x"},
        "hardware": {"model": "Test CPU", "flags": {"avx2": True, "amx_int8": False}},
        "commands": ["python tools/benchmark.py --models zoo_fake"],
        "load": [1.5, 2.0],
        "plot": "docs/benchmarks.png",
    }
    return [res, broken], meta


def test_markdown_shows_failures_and_numbers():
    results, meta = _fake_results()
    md = bm.markdown(results, meta)
    lines = md.splitlines()
    assert lines[0] == "# Benchmarks"
    assert "python tools/benchmark.py --models zoo_fake" in md[:400]  # reproduce at the top
    assert "onnxruntime 1.x" in md and "Test CPU" in md and "avx2" in md
    assert "threads = 1" in md
    # the failed peer is a row with its error, in the model table and the failures table
    row = next(ln for ln in lines if ln.startswith("| onnxslim |"))
    assert "FAILED" in row and "onnxslim cannot handle this model" in row
    assert "| zoo_fake | onnxslim | ValueError: onnxslim cannot handle this model |" in md
    # a failed model is shown, not dropped
    assert "| zoo_broken | (model) | RuntimeError: baseline fails |" in md
    assert "**FAILED**: RuntimeError: baseline fails" in md
    # ratios, fidelity, task metric, baseline p50
    assert "0.900 (0.85-0.95)" in md
    assert "0.999999 (0.999990)" in md
    assert "87.5%" in md
    assert "| zoo_fake | top-1 agreement | 10.00 ms | 0.90 / 100.0% | FAILED | 0.50 / 87.5% |" in md
    # graphopt notes from the report; same-level row
    assert "3/20 passes applied" in md and "rolled back fuse-bn" in md
    assert "| graphopt-O2 | = graphopt-O1 |" in md
    # fusion table
    assert "| zoo_fake | 14.00 ms | 11.20 ms | 0.800 (0.75-0.85) | 10.00 ms |" in md
    assert "![speedup vs fidelity per model](docs/benchmarks.png)" in md
    # every table row has the same number of cells as its header
    for i, ln in enumerate(lines):
        if ln.startswith("|---"):
            width = lines[i - 1].count("|")
            for body in itertools.takewhile(lambda x: x.startswith("|"), lines[i + 1 :]):
                assert body.count("|") == width, body


def test_plot_points_and_plot(tmp_path):
    results, _ = _fake_results()
    pts = {n: (sp, err) for n, sp, err in bm.plot_points(results[0])}
    assert "onnxslim" not in pts and "baseline" not in pts  # failed / reference
    assert pts["qdq-u8"] == (pytest.approx(2.0), pytest.approx(0.02))
    assert pts["graphopt-O1"][1] == bm.COS_FLOOR
    out = tmp_path / "plot.png"
    bm.write_plot(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_model(capsys):
    assert bm.main(["--models", "no_such_model", "--out", "/dev/null"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_merge_configs_from_a_later_invocation():
    results, meta = _fake_results()
    old = dict(results[0], invocation=1)
    old["configs"] = [dict(b, invocation=1) for b in old["configs"]]
    lat = {"p50": 20.0, "p10": 19.0, "p90": 21.0, "n": 30}
    new = {
        "model": "zoo_fake",
        "status": "ok",
        "invocation": 2,
        "rounds": 30,
        "baseline_ms": lat,
        "load_before": [3.0],
        "load_after": [4.0],
        "configs": [
            {"name": "baseline", "status": "ok", "latency_ms": lat, "invocation": 2},
            {"name": "control", "status": "ok", "latency_ms": lat, "invocation": 2,
             "ratio": {"median": 1.01, "p10": 0.9, "p90": 1.1}},
            {"name": "graphopt-O2", "status": "ok", "latency_ms": lat, "invocation": 2,
             "ratio": {"median": 0.7, "p10": 0.6, "p90": 0.8}, "cosine": 1.0,
             "task_value": 1.0},
            {"name": "graphopt-O3", "status": "failed", "error": "RuntimeError: boom",
             "invocation": 2},
        ],
    }  # fmt: skip
    merged = bm.merge_configs(old, new)
    names = [b["name"] for b in merged["configs"]]
    assert names.index("graphopt-O2") + 1 == names.index("graphopt-O3")  # config order kept
    by = {b["name"]: b for b in merged["configs"]}
    assert by["baseline"]["invocation"] == 1  # the earlier loop's baseline stays
    assert by["graphopt-O2"]["ratio"]["median"] == 0.7
    assert by["graphopt-O2"]["loop_baseline_p50"] == 20.0
    assert merged["extra_loops"][0]["control_ratio"]["median"] == 1.01
    meta = dict(meta, commands=["python tools/benchmark.py", "python tools/benchmark.py --append"])
    md = bm.markdown([merged], meta)
    assert "| zoo_fake | top-1 agreement | 10.00 ms |" in md
    assert "0.70 / 100.0% †" in md and "FAILED |" in md
    assert "† timed in a later invocation" in md
    assert "*invocation 2*" in md and "RuntimeError: boom" in md
    assert "Invocation 2: `python tools/benchmark.py --append`" in md


def test_render_only_rewrites_report_from_json(tmp_path):
    import json

    results, meta = _fake_results()
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"meta": meta, "results": results}))
    out, plot = tmp_path / "B.md", tmp_path / "docs" / "b.png"
    argv = ["--render-only", "--json", str(src), "--out", str(out), "--plot", str(plot)]
    assert bm.main(argv) == 0
    text = out.read_text()
    assert "onnxslim cannot handle this model" in text
    assert plot.exists()
    assert "](docs/b.png)" in text


# ------------------------------------------------------------------- included sections

GENERATED = "# Benchmarks\n\nGenerated table | 1.23x\n\n## Summary\n\nrow\n\n"
SOURCE_A = (
    "# Pruning: measured\n\nSpeedup **1.31x** at cosine 0.99.\n\n## Setup\n\n"
    "See [the curve](curve.py) and [fusion](#setup) and [peers](https://example.org/x).\n\n"
    "```sh\n# a shell comment, not a heading\npython curve.py\n```\n"
)
SOURCE_B = "# Scale\n\n| model | wall |\n|---|---:|\n| 100k | 70 s |\n"


def _sources(root: Path) -> tuple[bm.Include, ...]:
    (root / "plugins" / "pruning").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "plugins" / "pruning" / "MEASURED.md").write_text(SOURCE_A)
    (root / "docs" / "scale.md").write_text(SOURCE_B)
    return (
        bm.Include("plugins/pruning/MEASURED.md", "Pruning (issue #6)", 6, "curves"),
        bm.Include("docs/scale.md", "Scale (issue #8)", 8, "100k chain"),
    )


def _report(tmp_path: Path, text: str = GENERATED) -> Path:
    out = tmp_path / "out" / "BENCHMARKS.md"
    out.parent.mkdir()
    out.write_text(text)
    return out


def test_refresh_includes_appends_sections_and_keeps_generated_bytes(tmp_path):
    incs = _sources(tmp_path / "repo")
    out = _report(tmp_path)
    assert bm.refresh_includes(out, tmp_path / "repo", incs) is True
    text = out.read_text()
    assert text.startswith(GENERATED)
    generated, part = bm.split_report(text)
    assert generated == GENERATED and part is not None
    # each source between its markers, under its own heading naming the source file
    for inc in incs:
        begin = text.index(bm.INCLUDE_BEGIN.format(path=inc.path))
        end = text.index(bm.INCLUDE_END, begin)
        section = text[begin:end]
        assert f"## {inc.title}\n" in section
        assert f"Included from [`{inc.path}`](../repo/{inc.path})" in section
        assert "commands that reproduce these figures are in that file" in section
    # table of contents first, with the issue each section answers
    toc = part[: part.index(bm.INCLUDE_BEGIN.format(path=incs[0].path))]
    assert "| [Pruning (issue #6)](#pruning-issue-6) | #6 | curves |" in toc
    assert "| [Scale (issue #8)](#scale-issue-8) | #8 | 100k chain |" in toc
    # text verbatim; headings two levels down; fenced code and anchors/URLs untouched;
    # relative links re-based onto the source's folder
    assert "### Pruning: measured\n" in text and "#### Setup\n" in text
    assert "Speedup **1.31x** at cosine 0.99." in text
    assert "```sh\n# a shell comment, not a heading\npython curve.py\n```" in text
    assert "[the curve](../repo/plugins/pruning/curve.py)" in text
    assert "[fusion](#setup)" in text and "[peers](https://example.org/x)" in text
    assert "| 100k | 70 s |" in text
    assert text.endswith(bm.PART_END + "\n")


def test_refresh_includes_is_idempotent(tmp_path):
    incs = _sources(tmp_path / "repo")
    out = _report(tmp_path)
    bm.refresh_includes(out, tmp_path / "repo", incs)
    first = out.read_bytes()
    assert bm.refresh_includes(out, tmp_path / "repo", incs) is False
    assert out.read_bytes() == first


def test_refresh_includes_replaces_only_the_included_part(tmp_path):
    repo = tmp_path / "repo"
    incs = _sources(repo)
    out = _report(tmp_path)
    bm.refresh_includes(out, repo, incs)
    before = out.read_text()
    (repo / "docs" / "scale.md").write_text(SOURCE_B.replace("70 s", "9 s"))
    assert bm.refresh_includes(out, repo, incs) is True
    after = out.read_text()
    assert "| 100k | 9 s |" in after and "| 100k | 70 s |" not in after
    assert bm.split_report(after)[0] == bm.split_report(before)[0] == GENERATED
    for inc in incs:  # replaced, not appended a second time
        assert after.count(bm.INCLUDE_BEGIN.format(path=inc.path)) == 1
    assert after.count(bm.INCLUDE_END) == len(incs) and after.count(bm.PART_BEGIN) == 1


def test_refresh_includes_cli(tmp_path, monkeypatch):
    incs = _sources(tmp_path / "repo")
    monkeypatch.setattr(bm, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(bm, "INCLUDES", incs)
    out = _report(tmp_path)
    assert bm.main(["--refresh-includes", "--out", str(out)]) == 0
    assert bm.split_report(out.read_text())[0] == GENERATED
    assert "| 100k | 70 s |" in out.read_text()
    assert bm.main(["--refresh-includes", "--render-only", "--out", str(out)]) == 2


def test_refresh_includes_fails_clearly_on_a_missing_source(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    incs = _sources(repo)
    out = _report(tmp_path)
    bm.refresh_includes(out, repo, incs)
    before = out.read_bytes()
    (repo / "docs" / "scale.md").unlink()
    with pytest.raises(bm.IncludeError, match=r"docs/scale.md is listed in .*INCLUDES"):
        bm.refresh_includes(out, repo, incs)
    monkeypatch.setattr(bm, "ROOT", repo)
    monkeypatch.setattr(bm, "INCLUDES", incs)
    assert bm.main(["--refresh-includes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: docs/scale.md is listed" in err and "Nothing was written" in err
    assert out.read_bytes() == before
    # no report to refresh
    with pytest.raises(bm.IncludeError, match=r"does not exist: run tools/benchmark\.py"):
        bm.refresh_includes(tmp_path / "none.md", repo, incs)


def _break_end(t: str) -> str:
    return t.replace(bm.INCLUDE_END, "", 1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_break_end, "an include starts before the one of line"),
        (lambda t: t[::-1].replace(bm.INCLUDE_END[::-1], "", 1)[::-1], "ends inside the include"),
        (lambda t: t.replace(bm.PART_END, ""), "is missing"),
        (lambda t: t.replace(bm.INCLUDE_BEGIN.format(path="docs/scale.md"), ""),
         "without its start"),
        (lambda t: t + bm.PART_BEGIN + "\n", "appears 2 times"),
        (lambda t: t + "hand-written notes\n", "text after"),
        (lambda t: t.replace("row\n", "row\n" + bm.INCLUDE_END + "\n", 1),
         "inside the generated part"),
        (lambda t: t.replace(bm.PART_BEGIN, "<!-- start -->"), "without the line that starts"),
        (lambda t: t.replace(bm.INCLUDE_END, "<!-- end of include, sort of -->", 1), "malformed"),
    ],
)  # fmt: skip
def test_refresh_includes_refuses_broken_markers(tmp_path, mutate, message):
    repo = tmp_path / "repo"
    incs = _sources(repo)
    out = _report(tmp_path)
    bm.refresh_includes(out, repo, incs)
    broken = mutate(out.read_text())
    out.write_text(broken)
    with pytest.raises(bm.IncludeError, match=message):
        bm.refresh_includes(out, repo, incs)
    assert out.read_text() == broken  # nothing written


def test_source_with_a_marker_line_is_refused(tmp_path):
    repo = tmp_path / "repo"
    incs = _sources(repo)
    (repo / "docs" / "scale.md").write_text(SOURCE_B + bm.INCLUDE_END + "\n")
    out = _report(tmp_path)
    with pytest.raises(bm.IncludeError, match=r"contains a BENCHMARKS\.md include marker"):
        bm.refresh_includes(out, repo, incs)
    assert out.read_text() == GENERATED


def test_measuring_run_writes_generated_part_then_includes(tmp_path, monkeypatch):
    import json

    incs = _sources(tmp_path / "repo")
    monkeypatch.setattr(bm, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(bm, "INCLUDES", incs)
    results, meta = _fake_results()
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"meta": meta, "results": results}))
    out = tmp_path / "B.md"
    plot = tmp_path / "p.png"
    argv = ["--render-only", "--json", str(src), "--out", str(out), "--plot", str(plot)]
    assert bm.main(argv) == 0
    generated, part = bm.split_report(out.read_text())
    assert generated.startswith("# Benchmarks\n")
    assert "onnxslim cannot handle this model" in generated
    assert bm.PART_BEGIN not in generated
    assert part is not None and part.startswith(bm.PART_BEGIN) and "| 100k | 70 s |" in part
    assert bm.refresh_includes(out, tmp_path / "repo", incs) is False  # already current


def test_the_repository_include_list():
    assert [i.path for i in bm.INCLUDES] == [
        "plugins/runtime/MEASURED.md",
        "plugins/fusion/MEASURED.md",
        "plugins/substitution/MEASURED.md",
        "plugins/pruning/MEASURED.md",
        "plugins/quantization/MEASURED.md",
        "docs/scale.md",
    ]
    for inc in bm.INCLUDES:
        assert (ROOT / inc.path).is_file(), inc.path
    generated, _ = bm.split_report((ROOT / "BENCHMARKS.md").read_text())  # markers intact
    assert generated.startswith("# Benchmarks\n")
    assert bm.github_anchor("Operator substitution (issue #5)") == "operator-substitution-issue-5"


def test_measuring_run_keeps_its_figures_when_a_source_is_missing(tmp_path, monkeypatch):
    import json

    incs = _sources(tmp_path / "repo")
    (tmp_path / "repo" / "docs" / "scale.md").unlink()
    monkeypatch.setattr(bm, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(bm, "INCLUDES", incs)
    results, meta = _fake_results()
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"meta": meta, "results": results}))
    out, plot = tmp_path / "B.md", tmp_path / "p.png"
    argv = ["--render-only", "--json", str(src), "--out", str(out), "--plot", str(plot)]
    assert bm.main(argv) == 0
    generated, part = bm.split_report(out.read_text())
    assert part is None and "onnxslim cannot handle this model" in generated


def test_refresh_finds_a_start_line_of_another_wording(tmp_path):
    repo = tmp_path / "repo"
    incs = _sources(repo)
    out = _report(tmp_path)
    bm.refresh_includes(out, repo, incs)
    older = out.read_text().replace(bm.PART_BEGIN, "<!-- begin of included sections (v0) -->")
    out.write_text(older)
    assert bm.refresh_includes(out, repo, incs) is True
    text = out.read_text()
    assert bm.split_report(text)[0] == GENERATED and text.count("begin of included") == 1
