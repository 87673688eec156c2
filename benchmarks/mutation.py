"""Mutation testing of the method's core with mutmut: how many injected faults do the fast tests catch?

``make mutation`` (a benchmark, not part of ``make test``) runs, for each module below, ``mutmut run`` in a
throw-away copy of the repository whose ``pyproject.toml`` gets a ``[tool.mutmut]`` section naming the
module, the functions left out of scope, and ONLY the fast tests that exercise it. Results go to
``benchmarks/mutation/<module>.json`` (counts and the surviving mutants' diffs); the score is
killed / (all mutants - skipped). CPU-heavy: it runs under ``nice``, one module at a time.

    python benchmarks/mutation.py                     # every module
    python benchmarks/mutation.py metrics dicom       # some
    python benchmarks/mutation.py --max-children 2
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "mutation"
FAST = ["-m", "not integration"]
#: Statements that only say things (log lines) are not the method: mutants there are left out everywhere.
LOG_LINES = r"^\s*log\.(debug|info|warning|error)\("


def functions_except(*names: str) -> list[str]:
    return [rf"^def {name}\(" for name in names] + [LOG_LINES]


def out_of_scope(mutant: str, target: "Target") -> bool:
    """mutmut still generates mutants in excluded functions (and reports them as "no tests" when no selected
    test calls them): they are counted apart, not as survivors. Names look like model.export.x_parity__mutmut_3."""
    function = mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    if "\u01c1" in function:  # a method: x\u01c1Class\u01c1method
        return any(re.match(pattern, f"class {function.split(chr(0x1c1))[1]}") for pattern in target.out_of_scope
                   if pattern.startswith("^class "))
    function = function[2:] if function.startswith("x_") else function
    return any(re.match(pattern, f"def {function}(") for pattern in target.out_of_scope if pattern.startswith("^def "))


@dataclass
class Target:
    path: str
    tests: list[str]
    out_of_scope: list[str] = field(default_factory=lambda: [LOG_LINES])
    why_out_of_scope: str = ""


TARGETS = {
    "metrics": Target("model/metrics.py", ["tests/model/test_metrics.py", "tests/model/test_evaluation_claims.py", *FAST],
                      functions_except("save_plots"), "save_plots draws the PNGs (presentation, checked by the "
                      "registry test for existence only)"),
    "data": Target("model/data.py", ["tests/model/test_data.py", "tests/model/test_split_claims.py", *FAST],
                   functions_except("open_source", "discover", "_is_image_name", "_discover_npz", "resolve_source",
                                    "_init_worker", "_read_bytes", "gate_images", "_subsample", "_write_csv") +
                   [r"^class CachedData"],
                   "the issue scopes data.py to the split and the gate: discovery, downloads, worker plumbing and "
                   "the cache reader are out of scope"),
    "dicom": Target("model/dicom.py", ["tests/model/test_dicom.py", "tests/model/test_preprocessing_claims.py", *FAST]),
    "preprocessing": Target("model/preprocessing.py", ["tests/model/test_preprocessing.py", "tests/model/test_dicom.py",
                                                       "tests/model/test_preprocessing_claims.py", *FAST]),
    "export": Target("model/export.py", ["tests/model/test_export_claims.py", "-k", "int8_gate", *FAST],
                     functions_except("export_onnx", "parity", "quantize_int8", "_head_nodes") +
                     [r"^class _CalibrationReader"],
                     "the issue scopes export.py to the int8 gate; export and parity are covered by the integration "
                     "tests (ONNX vs PyTorch on real X-rays)"),
    "registry": Target("model/registry.py", ["tests/model/test_registry_claims.py", "-k", "promot"],
                       functions_except("default_tracking_uri", "connect", "_ensure_experiment", "git_commit",
                                        "log_and_register", "resolve_model_uri", "fetch_model") +
                       [r"^class (RegistryError|Registration)"],
                       "the issue scopes registry.py to the promotion decision (_decide_promotion)"),
}

STATUS = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>[\w ]+)$")


def config_section(target: Target) -> str:
    def toml_list(items):
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (f"\n[tool.mutmut]\nsource_paths = [\"model\"]\nonly_mutate = {toml_list([target.path])}\n"
            f"do_not_mutate_patterns = {toml_list(target.out_of_scope)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}\n"
            "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\", \"-q\", \"-x\", \"-p\", \"no:randomly\"]\n"
            "process_isolation = \"forkserver\"\n")


def run_module(name: str, target: Target, max_children: int, env: dict) -> dict:
    mutmut = str(Path(sys.executable).parent / "mutmut")
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        work = Path(tmp)
        for item in ("model", "tests"):
            shutil.copytree(REPO / item, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + config_section(target))
        started = time.perf_counter()
        run = subprocess.run(["nice", "-n", "15", mutmut, "run", "--max-children", str(max_children)], cwd=work,
                             env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                                 text=True).stdout
        statuses = {m["name"]: m["status"].strip() for m in map(STATUS.match, listing.splitlines()) if m}
        if not statuses or all(status == "not checked" for status in statuses.values()):
            # e.g. the clean run of the selected tests failed: no score, and the stored result stays as it was
            raise SystemExit(f"mutmut checked no mutant of {name} (exit {run.returncode}):\n"
                             f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        result = summarise(target, statuses, lambda mutant: subprocess.run(
            [mutmut, "show", mutant], cwd=work, env=env, capture_output=True, text=True).stdout.strip())
    result["seconds"] = round(seconds)
    return result


def summarise(target: Target, statuses: dict[str, str], show) -> dict:
    """Counts per status over the in-scope mutants, the score, and each surviving mutant's diff."""
    scoped = {m: ("out of scope" if out_of_scope(m, target) else s) for m, s in statuses.items()}
    counts: dict[str, int] = {}
    for status in scoped.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = {m: {"status": s, "diff": show(m)} for m, s in sorted(scoped.items())
                 if s not in ("killed", "skipped", "out of scope")}
    total = len(scoped) - counts.get("skipped", 0) - counts.get("out of scope", 0)
    return {"module": target.path, "tests": target.tests, "out_of_scope": target.why_out_of_scope,
            "mutants": total, "counts": counts, "score": round(counts.get("killed", 0) / total, 4) if total else None,
            "survivors": survivors}


def markdown_table() -> str:
    rows = ["| module (scope) | mutants | killed | survived | no test | timeout | other | score | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in TARGETS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            rows.append(f"| `{TARGETS[name].path}` | not run | | | | | | | |")
            continue
        r = json.loads(path.read_text())
        c = dict(r["counts"])
        known = {k: c.pop(k, 0) for k in ("killed", "survived", "no tests", "timeout", "skipped", "out of scope")}
        scored = r["mutants"]
        rows.append(f"| `{r['module']}` | {scored} | {known['killed']} | {known['survived']} | {known['no tests']} | "
                    f"{known['timeout']} | {sum(c.values())} | **{100 * r['score']:.1f} %** | "
                    f"{round(r['seconds'] / 60) if r.get('seconds') else '-'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", choices=[[], *TARGETS], help="default: all")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (default 1: shared CPU)")
    parser.add_argument("--table", action="store_true", help="print the stored results as a Markdown table")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table())
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.modules or list(TARGETS):
        print(f"== mutation testing {TARGETS[name].path} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="mutation-tiny-model-") as tiny:
            # the registry tests' trained fixture model is built once, not once per mutant
            env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONDONTWRITEBYTECODE="1",
                       PNEUMOSCOPE_TEST_TINY_MODEL=tiny)
            result = run_module(name, TARGETS[name], args.max_children, env)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{TARGETS[name].path}: {result['counts']} -> score {result['score']} ({result['seconds']} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
