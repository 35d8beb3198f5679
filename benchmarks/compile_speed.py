"""Compile speed: one handwritten-formula (HWF) query per symbol count, per SDD setting.

The program is DeepProbLog 2.1's own ``examples/HWF/model.pl`` (read as text; its Python modules
download data at import time). For each symbol count n (odd: a formula alternates digits and
operators, so an even count has no proof) one ground query ``expression([x1, ..., xn], R)`` is
compiled in a fresh child process (``--child``), so every measurement starts from an empty cache
and its peak memory (``ru_maxrss`` of that child, from ``os.wait4``) is its own. Settings:

* ``gc_on`` / ``gc_off``: :class:`gedi_nesy.logic.compiled.CompiledLogic` with ``sdd_auto_gc``
  true / false (the SDD library's automatic garbage collection and vtree minimisation during
  every conjoin and disjoin); then the query's probability on fixed tables, the size of the
  recorded circuit (sum-of-product terms) and the median milliseconds of ``--evals``
  evaluations (``query_probs``, batch 1);
* ``stock``: DeepProbLog's own exact engine, ``Solver.build_ac`` (grounding + ProbLog's SDD,
  DeepProbLog's default ``sdd_auto_gc=False``), compile time only.

``--vtree`` picks the SDD manager's initial vtree for ``gc_on`` / ``gc_off``: ``balanced`` is
ProbLog's own (over the query's atoms in the order ProbLog creates them); ``right``, ``left`` and
``vertical`` replace it in the child (ProbLog has no option for it, so the child patches
``SDD._create_manager``; the library never does).

A compile that runs past ``--timeout`` seconds is killed and reported as ``> T s`` with the peak
memory it had reached; once a setting times out, its larger symbol counts are not run. Example
(from the repository root):

    PYTHONPATH=. nice -n 10 python benchmarks/compile_speed.py --symbols 1 3 5 7 --timeout 600
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from problog.logic import Constant, Term, list2term

DEEPPROBLOG = Path(importlib.util.find_spec("deepproblog").origin).parent  # found, not imported
PROGRAM = DEEPPROBLOG / "examples" / "HWF" / "model.pl"
NETWORKS = {"net1": 10, "net2": 4}
FORMULAS = {1: "7", 3: "2+3", 5: "2+3*4", 7: "2+3*4-5", 9: "2+3*4-5/5"}  # value: eval(formula)
SETTINGS = {"gc_on": True, "gc_off": False, "stock": None}  # -> CompiledLogic's sdd_auto_gc
VTREES = ("balanced", "right", "left", "vertical")  # pysdd's vtree types; balanced is ProbLog's
MEMORY_CAP = 8 * 2**30  # bytes of address space per child: a runaway compile fails, not the host


def hwf_query(n: int) -> tuple[Term, float]:
    """``expression([tensor(img(0)), ..., tensor(img(n-1))], R)`` and R for the n-symbol formula."""
    formula = FORMULAS[n]
    images = [Term("tensor", Term("img", Constant(i))) for i in range(n)]
    value = float(eval(formula))  # the formula is one of FORMULAS: digits and + - * / only
    return Term("expression", list2term(images), Constant(value)), value


def fixed_tables(n: int) -> dict:
    """Fixed distributions: symbol i puts weight (j + 1 + i) / sum on class j of each network."""
    from gedi_nesy.logic.program import ProbabilityTable

    keys = [Term("tensor", Term("img", Constant(i))) for i in range(n)]
    tables = {}
    for name, k in NETWORKS.items():
        w = torch.arange(1, k + 1, dtype=torch.float64) + torch.arange(n).unsqueeze(1)  # (n, K)
        tables[name] = ProbabilityTable(keys, w / w.sum(1, keepdim=True))  # (n, K), rows sum to 1
    return tables


def use_vtree(vtree_type: str) -> None:
    """Make ProbLog's SDDs in this process start from a ``vtree_type`` vtree over their atoms."""
    from problog.sdd_formula import SDD, SDDManager
    from pysdd.sdd import SddManager, Vtree

    def create_manager(self: SDD) -> SDDManager:
        manager = SDDManager(auto_gc=self.auto_gc, varcount=1)
        n = max(self.init_varcount, 1)  # build_sdd sets it to the formula's atom count
        vtree = Vtree(var_count=n, vtree_type=vtree_type)
        inner = SddManager(var_count=n, auto_gc_and_minimize=self.auto_gc, vtree=vtree)
        manager._SDDManager__manager = inner  # ProbLog's manager keeps it name-mangled
        return manager

    SDD._create_manager = create_manager


def child_compiled(n: int, auto_gc: bool, evals: int, vtree: str) -> dict:
    """Compile the n-symbol query through CompiledLogic (fresh cache), then evaluate it."""
    from gedi_nesy.logic.compiled import CompiledLogic

    if vtree != "balanced":
        use_vtree(vtree)
    query, _ = hwf_query(n)
    tables = fixed_tables(n)
    with tempfile.TemporaryDirectory() as cache:
        logic = CompiledLogic(PROGRAM, NETWORKS, cache_dir=cache, sdd_auto_gc=auto_gc)
        start = time.perf_counter()
        logic.prepare([query])
        compile_s = time.perf_counter() - start
    prob = float(logic.query_probs([query], tables).probs[0])
    times = []
    for _ in range(evals):
        start = time.perf_counter()
        logic.query_probs([query], tables)
        times.append(time.perf_counter() - start)
    terms = sum(len(lay.circuit.term_op) for lay in logic._layouts.values())
    ms = 1e3 * statistics.median(times)
    return {"compile_s": compile_s, "terms": terms, "eval_ms": ms, "prob": prob}


def child_stock(n: int) -> dict:
    """Time DeepProbLog's own grounding + SDD compilation of the n-symbol query."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: no PySwip
        from deepproblog.engines import ExactEngine
        from deepproblog.model import Model
        from deepproblog.network import Network
        from deepproblog.query import Query

    networks = [Network(torch.nn.Identity(), name) for name in NETWORKS]
    model = Model(PROGRAM.read_text(), networks, load=False)
    model.set_engine(ExactEngine(model), cache=False)
    query, _ = hwf_query(n)
    start = time.perf_counter()
    model.solver.build_ac(Query(query))
    return {"compile_s": time.perf_counter() - start}


def run_child(n: int, setting: str, timeout: float, evals: int, vtree: str) -> dict:
    """Run one measurement in a child process; kill it after ``timeout`` seconds."""
    cmd = [sys.executable, __file__, "--child", setting, str(n), str(evals), vtree]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    wall = time.perf_counter() - start
    row = {"n": n, "setting": setting, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}
    if os.WIFSIGNALED(status) and wall >= timeout:
        return {**row, "status": "timeout"}
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return {**row, "status": f"failed (status {status})"}
    return {**row, "status": "ok", **json.loads(out.strip().splitlines()[-1])}


def child_main(setting: str, n: int, evals: int, vtree: str) -> None:
    """Entry point of a child: cap memory, one thread, measure, print one JSON line."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    torch.set_num_threads(1)
    if setting == "stock":
        result = child_stock(n)
    else:
        result = child_compiled(n, SETTINGS[setting], evals, vtree)
    print(json.dumps(result), flush=True)


def format_row(r: dict, timeout: float) -> str:
    """One markdown table row of a measurement."""
    mem = f"{r['peak_mb']:.0f}"
    if r["status"] == "timeout":
        return f"| {r['n']} | {r['setting']} | > {timeout:.0f} | >= {mem} | - | - | - |"
    if r["status"] != "ok":
        return f"| {r['n']} | {r['setting']} | {r['status']} | {mem} | - | - | - |"
    terms = f"{r['terms']:,}" if "terms" in r else "-"
    ms = f"{r['eval_ms']:.2f}" if "eval_ms" in r else "-"
    prob = f"{r['prob']:.15g}" if "prob" in r else "-"
    cells = [r["n"], r["setting"], f"{r['compile_s']:.1f}", mem, terms, ms, prob]
    return "| " + " | ".join(map(str, cells)) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, nargs="+", default=[1, 3, 5, 7])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per compile")
    parser.add_argument("--evals", type=int, default=20, help="timed evaluations per circuit")
    parser.add_argument(
        "--vtree", choices=VTREES, default="balanced", help="vtree of gc_on, gc_off"
    )
    args = parser.parse_args()
    bad = [n for n in args.symbols if n not in FORMULAS]
    if bad:
        parser.error(f"--symbols {bad}: allowed {sorted(FORMULAS)} (odd: digits and operators)")
    print(
        f"program {PROGRAM}; formulas {FORMULAS}; timeout {args.timeout:.0f} s; vtree {args.vtree}",
        flush=True,
    )
    print("| symbols | setting | compile s | peak MB | terms | eval ms | probability |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for setting in args.settings:
        for n in sorted(args.symbols):
            row = run_child(n, setting, args.timeout, args.evals, args.vtree)
            print(format_row(row, args.timeout), flush=True)
            if row["status"] != "ok":
                print(f"| > {n} | {setting} | not run: {n} symbols did not finish | | | | |")
                break


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
