"""Pipeline text / TOML parsing, canonical printing, presets and option typing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphopt
from graphopt.errors import PipelineError
from graphopt.pipeline import (
    PassSpec,
    format_pipeline,
    load_config,
    parse_pipeline,
    preset,
    resolve,
)


def test_parse_names_and_options():
    specs = parse_pipeline('fold-constants, dce{} ,acme.scale{k=2,ratio=0.5,on=true,mode="a b"}')
    assert specs == [
        PassSpec("fold-constants"),
        PassSpec("dce"),
        PassSpec("acme.scale", {"k": 2, "ratio": 0.5, "on": True, "mode": "a b"}),
    ]


def test_canonical_form_sorts_options_and_round_trips():
    text = 'b{z=1,a="x,y"},a'
    canon = format_pipeline(parse_pipeline(text))
    assert canon == 'b{a="x,y",z=1},a'
    assert parse_pipeline(canon) == parse_pipeline(text)


_names = st.from_regex(r"[a-z][a-z0-9_.\-]{0,8}", fullmatch=True)
_values = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=8),
)


@given(
    st.lists(
        st.tuples(_names, st.dictionaries(_names, _values, max_size=3)), min_size=1, max_size=4
    )
)
def test_round_trip_property(items):
    specs = [PassSpec(n, o) for n, o in items]
    text = format_pipeline(specs)
    again = parse_pipeline(text)
    assert again == specs
    assert format_pipeline(again) == text


@pytest.mark.parametrize(
    ("text", "column"),
    [("dce{x=1", 8), ("dce,,cse", 5), ("dce{=1}", 5), ('dce{x="open}', 7), ("dce{x=1,x=2}", 9)],
)
def test_malformed_pipeline_names_the_column(text, column):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert f"column {column}" in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_pipeline_is_an_error():
    with pytest.raises(PipelineError, match="empty pipeline"):
        parse_pipeline("  ")


class _Opt(graphopt.Pass):
    name = "t.opt"
    summary = "options test"
    options = {
        "k": graphopt.Option(int, 1, "an int"),
        "mode": graphopt.Option(str, "a", "a choice", choices=("a", "b")),
        "on": graphopt.Option(bool, False),
        "ratio": graphopt.Option(float, 0.5),
    }

    def run(self, model, ctx):
        return graphopt.PassResult(False)


def test_resolve_types_options_and_rejects_bad_ones():
    (p,) = resolve(parse_pipeline("t.opt{k=3,on=true,ratio=1}"), {"t.opt": _Opt})
    assert p.config == {"k": 3, "mode": "a", "on": True, "ratio": 1.0}
    for bad, msg in [
        ("t.opt{k=x}", "integer"),
        ("t.opt{mode=c}", "one of a, b"),
        ("t.opt{nope=1}", "no option 'nope'"),
        ("t.opt{k=1.5}", "integer"),
    ]:
        with pytest.raises(PipelineError, match=msg):
            resolve(parse_pipeline(bad), {"t.opt": _Opt})


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(PipelineError, match=r"did you mean 't\.opt'"):
        resolve([PassSpec("t.opr")], {"t.opt": _Opt})


def _make(name, level, order, tolerance=graphopt.Tolerance.EXACT):
    return type(
        name, (_Opt,), {"name": name, "level": level, "order": order, "tolerance": tolerance}
    )


def test_presets_follow_levels_and_order():
    reg = {
        "clean": _make("clean", 1, (10, 900)),
        "fuse": _make("fuse", 1, 100, graphopt.Tolerance.APPROXIMATE),
        "subst": _make("subst", 2, 200, graphopt.Tolerance.APPROXIMATE),
        "prune": _make("prune", 3, 300, graphopt.Tolerance.LOSSY),
        "named-only": _make("named-only", None, 50),
    }
    assert preset(0, reg) == []
    assert [s.name for s in preset(1, reg)] == ["clean", "fuse", "clean"]
    assert [s.name for s in preset(2, reg)] == ["clean", "fuse", "subst", "clean"]
    assert [s.name for s in preset(3, reg)] == ["clean", "fuse", "subst", "prune", "clean"]
    with pytest.raises(PipelineError):
        preset(4, reg)


def test_toml_config(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "dce"\n\n[[pass]]\nname = "t.opt"\noptions = { k = 2 }\n')
    assert load_config(cfg) == [PassSpec("dce"), PassSpec("t.opt", {"k": 2})]
    assert format_pipeline(load_config(cfg)) == "dce,t.opt{k=2}"
    cfg.write_text("[[pass]]\nname = \n")
    with pytest.raises(PipelineError, match="TOML"):
        load_config(cfg)
    cfg.write_text('[[pass]]\nname = "x"\nopts = 1\n')
    with pytest.raises(PipelineError, match="unknown key 'opts'"):
        load_config(cfg)
