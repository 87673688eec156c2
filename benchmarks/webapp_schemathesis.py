"""The long schemathesis run against the web app: at least --cases test cases over every operation of
``/openapi.json`` (coverage, fuzzing and stateful phases), signed in with an admin's API token.

    python benchmarks/webapp_schemathesis.py [--cases 10000] [--database sqlite|postgresql] [--out runs/st.json]

A finding is any answer >= 500, an error of the run, a traceback in the app's log, or a stored study without its
whole file (or a file without its study). The short, seeded version runs in ``make test``
(tests/webapp/test_webapp_schemathesis.py). Exit status 1 on any finding or when fewer than --cases ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import cpu_info, log, write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="at least this many test cases in all")
    parser.add_argument("--max-examples", type=int, default=1500, help="schemathesis --max-examples per operation")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql",
                        help="postgresql: a throw-away PostgreSQL 15 (Debian's postgresql-15)")
    parser.add_argument("--inference-url", help="a running transformer (studies are then scored); default: none "
                                                "(uploads stay pending)")
    parser.add_argument("--keep", help="folder to keep the app's log, database and schemathesis' report in")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    from schemathesis_run import fuzz_web_app
    from webapp_fixtures import running_postgres

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pneumoscope-schemathesis-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    log(f"schemathesis, at least {args.cases} cases, {args.database}, seed {args.seed}; files in {root}")
    if args.database == "postgresql":
        with running_postgres(durable=True) as server:
            run = fuzz_web_app(root, args.max_examples, args.seed, server.create_database("fuzz"),
                               args.inference_url)
    else:
        run = fuzz_web_app(root, args.max_examples, args.seed, None, args.inference_url)
    report = {"benchmark": "webapp_schemathesis", "cases": run.cases, "operations": run.report["operations"],
              "phases": run.report["phases"], "failures": run.failures, "errors": run.errors,
              "tracebacks_in_app_log": run.tracebacks, "studies_stored_and_consistent": run.studies,
              "warnings": {k: v for k, v in run.report["warnings"].items() if v}, "seed": args.seed,
              "database": args.database, "seconds": round(time.perf_counter() - started, 1),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_info(), "files": str(root)}
    write_report(report, args.out)
    ok = run.clean and run.cases >= args.cases
    log(f"{run.cases} cases, {len(run.failures)} failures, {len(run.errors)} errors, {run.tracebacks} tracebacks: "
        f"{'clean' if ok else 'FINDINGS (or too few cases)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
