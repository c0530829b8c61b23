"""The built-in cleanup passes, registered through the ``graphopt`` entry-point group.

========================== =========== ===== ========== =====================================
pass                       tolerance   level order      done by
========================== =========== ===== ========== =====================================
fold-constants             approximate 1     10, 900    onnxscript constant folder + onnx_ir
eliminate-identity         exact       1     20, 910    onnx_ir IdentityEliminationPass
cse                        exact       1     30, 920    onnx_ir CommonSubexpressionElimination
dce                        exact       1     40, 930    onnx_ir RemoveUnusedNodesPass
remove-unused-initializers exact       1     50, 940    own code + onnx_ir unused opsets/funcs
topo-sort                  exact       1     60, 950    onnx_ir TopologicalSortPass
onnxsim                    approximate -p    -          onnx-simplifier
========================== =========== ===== ========== =====================================

Each module's docstring says what its pass does, which library does the work and where our
own code fills a gap.
"""

from __future__ import annotations

from collections.abc import Callable

import graphopt

from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .eliminate_identity import EliminateIdentity
from .fold_constants import FoldConstants
from .onnxsim_pass import OnnxSimplifier
from .remove_unused_initializers import RemoveUnusedInitializers
from .topo_sort import TopologicalSort

__all__ = [
    "PASSES",
    "CommonSubexpressionElimination",
    "DeadCodeElimination",
    "EliminateIdentity",
    "FoldConstants",
    "OnnxSimplifier",
    "RemoveUnusedInitializers",
    "TopologicalSort",
    "graphopt_register_passes",
]

PASSES: tuple[type[graphopt.Pass], ...] = (
    FoldConstants,
    EliminateIdentity,
    CommonSubexpressionElimination,
    DeadCodeElimination,
    RemoveUnusedInitializers,
    TopologicalSort,
    OnnxSimplifier,
)


@graphopt.hookimpl
def graphopt_register_passes(register: Callable[[type[graphopt.Pass]], None]) -> None:
    """Register every cleanup pass."""
    for cls in PASSES:
        register(cls)
