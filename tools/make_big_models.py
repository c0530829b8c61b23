"""Generate the big models of graphopt's scale tests, and measure ``graphopt run`` on them.

Two generators, both deterministic:

* ``chain(n_nodes)``: one long chain of cheap elementwise ops on a ``[1, 16]`` float32
  input, in blocks of five nodes ``Add(c) -> Relu -> Identity -> Mul(c) -> Tanh`` with a
  few shared constants; every 50th block also carries a constant subexpression
  (``Add(Constant, Constant)``, for fold-constants) and a ``Transpose`` pair (for
  fuse-reshape-chains). The Identity nodes are for eliminate-identity. The model is
  exactly ``n_nodes`` nodes (``--nodes 100000`` is the issue's 100k-node chain).
* ``external(path, gigabytes)``: a model whose weights (``tables`` float32 embedding
  tables, each under protobuf's 2 GiB) total ``gigabytes`` GB, stored as external data in
  ``<name>.data`` beside it. The tables are written through a ``numpy.memmap`` in chunks
  (a cheap deterministic pattern), so generating 2.2 GB takes seconds and little memory.
  The graph gathers a few rows of each table (cheap to run in onnxruntime), sums them,
  and carries Identity nodes, a constant subexpression and a dead branch, so -O1 has
  work to do.

Measuring (``measure``) runs ``graphopt run`` in a child process under ``/usr/bin/time
-v`` (peak RSS) and reads the ``--report`` JSON (per-pass seconds)::

    python tools/make_big_models.py chain --nodes 100000 --out /tmp/big/chain100k.onnx
    python tools/make_big_models.py external --gb 2.2 --out /tmp/big/ext.onnx
    python tools/make_big_models.py measure /tmp/big/chain100k.onnx -- -O1 --validate none
    python tools/make_big_models.py measure /tmp/big/ext.onnx -- -O1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["chain", "external", "measure"]

F32 = TensorProto.FLOAT
WIDTH = 16
DIM = 256  # embedding width of the external-data tables
ALIGN = 4096


# --------------------------------------------------------------------------- chain


def chain(n_nodes: int, *, width: int = WIDTH, opset: int = 17) -> onnx.ModelProto:
    """A chain of exactly ``n_nodes`` nodes (see the module doc)."""
    if n_nodes < 5:
        raise ValueError("a chain needs at least 5 nodes")
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.full(width, 0.01, np.float32), "c_add"),
        numpy_helper.from_array(np.full(width, 0.99, np.float32), "c_mul"),
    ]
    cur = "x"
    i = 0

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        nonlocal i
        out = f"v{i}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"n{i}", **attrs))
        i += 1
        return out

    block = 0
    while n_nodes - len(nodes) >= 5:
        left = n_nodes - len(nodes)
        if block % 50 == 49 and left >= 9 + 5:
            a = node("Constant", [], value=numpy_helper.from_array(np.full(width, 0.5, np.float32)))
            b = node("Constant", [], value=numpy_helper.from_array(np.full(width, 0.5, np.float32)))
            cur = node("Mul", [cur, node("Add", [a, b])])  # folds to Mul(cur, 1)
            t = node("Transpose", [node("Unsqueeze", [cur, "axes0"])], perm=[1, 0, 2])
            cur = node("Squeeze", [node("Transpose", [t], perm=[1, 0, 2]), "axes0"])
        else:
            cur = node("Add", [cur, "c_add"])
            cur = node("Relu", [cur])
            cur = node("Identity", [cur])
            cur = node("Mul", [cur, "c_mul"])
            cur = node("Tanh", [cur])
        block += 1
    while len(nodes) < n_nodes:
        cur = node("Relu", [cur])
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        f"chain{n_nodes}",
        [helper.make_tensor_value_info("x", F32, [1, width])],
        [helper.make_tensor_value_info("y", F32, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    model.producer_name = "graphopt-make_big_models"
    return model


# --------------------------------------------------------------------------- external


def external(path: Path, gigabytes: float, *, tables: int = 4, rows_gathered: int = 8) -> Path:
    """Write ``path`` and ``path.name + '.data'``: ``tables`` float32 ``[rows, DIM]`` tables
    totalling about ``gigabytes`` GB, stored externally; returns the model path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    per_table = int(gigabytes * 1e9 / tables)
    rows = max(1, per_table // (DIM * 4))
    nbytes = rows * DIM * 4
    assert nbytes < 2**31 - 1, "one table must stay under protobuf's 2 GiB"
    stride = -(-nbytes // ALIGN) * ALIGN
    total = stride * tables
    mm = np.memmap(path.parent / data_name, dtype=np.uint8, mode="w+", shape=(total,))
    chunk_rows = max(1, (64 << 20) // (DIM * 4))  # 64 MiB at a time
    base = np.arange(DIM, dtype=np.float32) / DIM
    for t in range(tables):
        view = np.ndarray((rows, DIM), np.float32, buffer=mm, offset=t * stride)
        for r0 in range(0, rows, chunk_rows):
            r1 = min(rows, r0 + chunk_rows)
            idx = np.arange(r0, r1, dtype=np.float32)[:, None]
            view[r0:r1] = np.sin(idx * 0.001 + base + t)
    mm.flush()
    del mm

    inits = []
    for t in range(tables):
        tensor = onnx.TensorProto()
        tensor.name = f"table{t}"
        tensor.data_type = F32
        tensor.dims.extend([rows, DIM])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data_name),
            ("offset", str(t * stride)),
            ("length", str(nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
    half = numpy_helper.from_array(np.full(DIM, 0.5, np.float32), "half")
    nodes = []
    gathered = []
    for t in range(tables):
        g = f"g{t}"
        nodes.append(helper.make_node("Gather", [f"table{t}", "ids"], [g], name=f"gather{t}"))
        nodes.append(helper.make_node("Identity", [g], [g + "_id"], name=f"id{t}"))
        gathered.append(g + "_id")
    acc = gathered[0]
    for t, g in enumerate(gathered[1:], 1):
        nodes.append(helper.make_node("Add", [acc, g], [f"sum{t}"], name=f"sum{t}"))
        acc = f"sum{t}"
    nodes += [
        helper.make_node("Add", ["half", "half"], ["one"], name="const_expr"),  # folds
        helper.make_node("Mul", [acc, "one"], ["scaled"], name="scale"),
        helper.make_node("Relu", ["scaled"], ["y"], name="relu"),
        helper.make_node("Exp", [acc], ["dead"], name="dead"),  # nobody reads it
    ]
    graph = helper.make_graph(
        nodes,
        "external_tables",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, rows_gathered])],
        [helper.make_tensor_value_info("y", F32, [1, rows_gathered, DIM])],
        [*inits, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model.producer_name = "graphopt-make_big_models"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- measure


def _graphopt() -> list[str]:
    exe = Path(sys.executable).with_name("graphopt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graphopt.cli"]


def measure(model: Path, args: list[str], *, out: Path | None = None) -> dict[str, Any]:
    """Run ``graphopt run MODEL -o OUT --report R ARGS`` under /usr/bin/time -v.

    Returns wall seconds, peak RSS (MiB), the report's seconds, each pass's seconds and
    status, and the files written.
    """
    model = Path(model)
    work = Path(tempfile.mkdtemp(prefix="graphopt-big-", dir=model.parent))
    out = out or work / (model.stem + ".opt.onnx")
    report = work / "report.json"
    cmd = [*_graphopt(), "run", str(model), "-o", str(out), "--report", str(report), "-q", *args]
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    started = time.perf_counter()
    proc = subprocess.run(timed, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result: dict[str, Any] = {
        "command": " ".join(["graphopt", *cmd[len(_graphopt()) :]]),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "stderr_tail": "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("\t"))[
            -1500:
        ],
    }
    if report.exists():
        rep = json.loads(report.read_text())
        result["report_seconds"] = rep["seconds"]
        result["final"] = rep["final"]["status"]
        result["model"] = rep["model"]
        result["passes"] = [
            {"name": p["name"], "status": p["status"], "seconds": round(p["seconds"], 3)}
            for p in rep["passes"]
        ]
        result["pass_seconds"] = round(sum(p["seconds"] for p in rep["passes"]), 2)
    result["written"] = sorted(
        f"{p.name} ({p.stat().st_size} B)" for p in out.parent.iterdir() if p.is_file()
    )
    shutil.rmtree(work, ignore_errors=True)  # the report is read; an explicit `out` stays
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("chain", help="write an n-node chain model")
    c.add_argument("--nodes", type=int, default=100_000)
    c.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("external", help="write a model with GB of external data")
    e.add_argument("--gb", type=float, default=2.2)
    e.add_argument("--tables", type=int, default=4)
    e.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure", help="time graphopt run on a model (args after --)")
    m.add_argument("model", type=Path)
    m.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "chain":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        model = chain(args.nodes)
        args.out.write_bytes(model.SerializeToString())
        print(f"wrote {args.out} ({args.nodes} nodes) in {time.perf_counter() - t:.1f}s")
    elif args.cmd == "external":
        t = time.perf_counter()
        path = external(args.out, args.gb, tables=args.tables)
        size = (path.parent / (path.name + ".data")).stat().st_size
        print(
            f"wrote {path} + {size / 1e9:.2f} GB of external data in {time.perf_counter() - t:.1f}s"
        )
    else:
        rest = [a for a in args.rest if a != "--"]
        print(json.dumps(measure(args.model, rest), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
