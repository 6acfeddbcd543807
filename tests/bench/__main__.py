"""``make bench`` / ``python -m tests.bench``: the stack against its floor and the design's
ceiling (and, when asked, the same work without the gRPC hop), with wrk.

Settings come from options or, so that ``make bench VAR=...`` works, from environment:

    BENCH_DURATION  seconds per measured run (default 10; e.g. 3 for a quick check)
    BENCH_WARMUP    seconds of warm-up before each measured run (default 2)
    BENCH_CASES     which cases, e.g. "1,3" (default: all seven; 5-7 call an `openai`
                    provider on loopback, tests/bench/upstream.py)
    BENCH_THREADS   wrk threads (default 1, capped at the connections)
    BENCH_JSON      also write the figures as JSON to this file
    BENCH_DATABASE_URL  keep the ledger in this PostgreSQL (postgresql://...) instead of
                    each case's SQLite file; the harness runs `imagegen-admin db upgrade`
    BENCH_CEILING=0 skip the design's ceiling (tests/bench/ceiling.py: aiohttp + one
                    grpc.aio call to a service that does nothing), measured by default
    BENCH_CEILING_LEDGER=1  the ceiling's service also holds and settles each generation
                    in the real ledger (SQLite), as exact billing must: what the design
                    reaches when every generation is charged
    BENCH_INPROCESS=1  also measure the same work without the gRPC hop (--inprocess;
                    tests/bench/inprocess.py: the real gateway's code calling the real
                    service's pipeline in one process, an experiment for a design
                    question), on its own data directory, with its billing checked
    BENCH_PROFILE   also profile case 2 with py-spy (and count SQLite busy-handler sleeps
                    with strace), raw stacks into this directory; py-spy is not a project
                    dependency: `.venv/bin/pip install py-spy`
    BENCH_PROFILE_CASE  profile this case instead of case 2
    BENCH_PROFILE_GIL=1 sample only the thread holding the GIL (py-spy --gil)
    BENCH_KEEP=1    keep the temporary directories (configs, logs) for inspection
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.bench.harness import BenchError, run, selected_cases


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        sys.exit(f"bench: {name} must be a number of seconds; got {raw!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=_float_env("BENCH_DURATION", 10.0))
    parser.add_argument("--warmup", type=float, default=_float_env("BENCH_WARMUP", 2.0))
    parser.add_argument("--cases", default=os.environ.get("BENCH_CASES", ""))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS") or 1))
    parser.add_argument("--json", type=Path, default=os.environ.get("BENCH_JSON") or None)
    parser.add_argument("--profile", type=Path, default=os.environ.get("BENCH_PROFILE") or None)
    parser.add_argument("--keep", action="store_true", default=bool(os.environ.get("BENCH_KEEP")))
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        default=os.environ.get("BENCH_CEILING", "1") != "0",
        help="skip the design's ceiling (BENCH_CEILING=0)",
    )
    parser.add_argument(
        "--ceiling-ledger",
        action="store_true",
        default=os.environ.get("BENCH_CEILING_LEDGER", "0") == "1",
        help="the ceiling's service also holds and settles each generation in the real "
        "ledger (BENCH_CEILING_LEDGER=1)",
    )
    parser.add_argument(
        "--inprocess",
        action="store_true",
        default=os.environ.get("BENCH_INPROCESS", "0") == "1",
        help="also measure the same work without the gRPC hop (BENCH_INPROCESS=1)",
    )
    args = parser.parse_args()
    if args.duration < 1 or args.warmup < 1:
        sys.exit("bench: --duration and --warmup must be at least 1 second")
    try:
        code = run(
            seconds=args.duration,
            warmup=args.warmup,
            cases=selected_cases(args.cases),
            threads=args.threads,
            json_path=args.json,
            profile_dir=args.profile,
            keep=args.keep,
            ceiling=args.ceiling,
            ceiling_ledger=args.ceiling_ledger,
            inprocess=args.inprocess,
        )
    except BenchError as exc:
        sys.exit(f"bench: FAILED: {exc}")
    except KeyboardInterrupt:
        sys.exit("bench: interrupted")
    sys.exit(code)


if __name__ == "__main__":
    main()
