"""Einsum -> MatMul / Transpose (APPROXIMATE: the MatMul may sum in another order).

Two operands, as a batched matrix product. Each letter of the equation is a *batch* letter
(in both operands and the output), ``m`` (first operand and output), ``n`` (second operand
and output) or ``k`` (both operands, not the output). With exactly one ``m``, one ``n`` and
one ``k``::

    Einsum("<A>,<B>-><out>", a, b)
        = Transpose(MatMul(Transpose(a, batch+[m, k]), Transpose(b, batch+[k, n])), out)

where each Transpose is left out when it is the identity: ``"bij,bjk->bik"`` is one
MatMul, ``"bhqd,bhkd->bhqk"`` a Transpose of b and a MatMul. One operand that is only
permuted (``"nchw->nhwc"``) is a Transpose.

Not rewritten: ellipses, a letter repeated within one operand (diagonals), letters summed
away from one operand only, several ``k`` (or ``m`` / ``n``) letters (those need Reshapes,
with dynamic shapes); the near miss says which. onnxruntime runs Einsum by planning
Transposes and MatMuls at run time; the explicit form skips that and lets its graph
optimizer fuse the Transposes into the MatMul (``FusedMatMul``). graphopt's rule.
"""

from __future__ import annotations

import re

from graphopt_plugins.fusion._base import Env, FusionRule, Rule, fail

__all__ = ["parse", "plan", "rules"]

_TERM = re.compile(r"^[A-Za-z]*$")


def parse(equation: str) -> tuple[list[str], str]:
    """(input terms, output term) of an equation without ellipses; implicit outputs are the
    letters used exactly once, sorted (numpy's convention)."""
    eq = equation.replace(" ", "")
    if "." in eq:
        raise ValueError("ellipsis")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    for t in [*terms, out]:
        if not _TERM.match(t):
            raise ValueError(f"cannot read term {t!r}")
    return terms, out


def plan(terms: list[str], out: str) -> dict[str, list[int] | None]:
    """Transpose permutations for the MatMul form (None: identity), or ValueError why not."""
    for t in [*terms, out]:
        if len(set(t)) != len(t):
            raise ValueError(f"letter repeated in {t!r} (a diagonal)")
    if len(terms) == 1:
        (a,) = terms
        if sorted(a) != sorted(out):
            raise ValueError("the single operand is reduced, not only permuted")
        perm = [a.index(c) for c in out]
        return {"out": perm}
    if len(terms) != 2:
        raise ValueError(f"{len(terms)} operands")
    a, b = terms
    batch = [c for c in out if c in a and c in b]
    ms = [c for c in out if c in a and c not in b]
    ns = [c for c in out if c in b and c not in a]
    ks = [c for c in a if c in b and c not in out]
    lost = [c for c in a + b if c not in out and c not in ks]
    if lost:
        raise ValueError(f"letter {lost[0]!r} is summed away from one operand only")
    if len(ks) != 1 or len(ms) != 1 or len(ns) != 1:
        raise ValueError(
            f"{len(ms)} m, {len(ns)} n and {len(ks)} k letters (MatMul needs "
            "one of each without Reshapes)"
        )
    m, n, k = ms[0], ns[0], ks[0]
    pa = [a.index(c) for c in [*batch, m, k]]
    pb = [b.index(c) for c in [*batch, k, n]]
    mm = [*batch, m, n]
    po = [mm.index(c) for c in out]

    def ident(p: list[int]) -> list[int] | None:
        return None if p == list(range(len(p))) else p

    return {"a": ident(pa), "b": ident(pb), "out": ident(po)}


class EinsumRule(Rule):
    def __init__(self, env: Env, arity: int) -> None:
        super().__init__(env, f"Einsum{arity}")
        self.arity = arity

    def pattern(self, op, a, b):
        return op.Einsum(a, b, _outputs=["out"])

    def check(self, context, a, out, b=None, **_):
        eq = out.producer().attributes.get_string("equation", "")
        try:
            terms, term_out = parse(eq)
            if len(terms) != self.arity:
                raise ValueError(f"{len(terms)} terms for {self.arity} inputs")
            self._plan = plan(terms, term_out)
        except ValueError as e:
            raise fail(f"Einsum {eq!r}: {e}") from None
        return True

    def rewrite(self, op, a, b=None, **_):
        p = self._plan
        if self.arity == 1:
            return op.Transpose(a, perm=p["out"], _name=self.env.fresh("EinsumTranspose"))
        if p["a"] is not None:
            a = op.Transpose(a, perm=p["a"], _name=self.env.fresh("EinsumTransposeA"))
        if p["b"] is not None:
            b = op.Transpose(b, perm=p["b"], _name=self.env.fresh("EinsumTransposeB"))
        y = op.MatMul(a, b, _name=self.env.fresh("EinsumMatMul"))
        if p["out"] is not None:
            y = op.Transpose(y, perm=p["out"], _name=self.env.fresh("EinsumTransposeOut"))
        return y


class Einsum1(EinsumRule):
    def pattern(self, op, a):
        return op.Einsum(a, _outputs=["out"])


def rules(env: Env) -> list[FusionRule]:
    return [FusionRule("einsum_to_matmul", [Einsum1.rule(env, 1), EinsumRule.rule(env, 2)])]
