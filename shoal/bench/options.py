"""The `shoal bench` command line: argparse only, so `shoal --help` imports nothing heavy."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite against a running Shoal or a private one",
        description="Measure Shoal and its peers in one run (docs/performance.md). Without "
        "--url a private instance is started (temporary SHOAL_HOME, free port) and stopped.",
    )
    bench.add_argument("--url", default="", help="a running Shoal (127.0.0.1 only)")
    bench.add_argument("--key", default="", help="its API key (default: SHOAL_HOME/dev-api-key)")
    bench.add_argument(
        "--admin-key",
        default="",
        help="its admin key, for /healthz's details (default: SHOAL_HOME/admin-api-key)",
    )
    bench.add_argument("--home", default="", help="its SHOAL_HOME, for the worker log")
    bench.add_argument("--redis-url", default="", help="Redis for the Celery peer")
    bench.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes")
    bench.add_argument("--only", default="", help="comma-separated scenario names")
    bench.add_argument("--skip", default="", help="comma-separated scenario names to leave out")
    bench.add_argument("--no-peers", action="store_true", help="skip the peer measurements")
    bench.add_argument(
        "--density",
        type=int,
        default=0,
        metavar="N",
        help="also run the density scenario up to N idle sessions",
    )
    bench.add_argument(
        "--density-window",
        type=float,
        default=30.0,
        metavar="S",
        help="idle CPU window per density step (s)",
    )
    bench.add_argument(
        "--neighbour-key",
        default="",
        metavar="KEY",
        help="with --url: a key of a second tenant, the noisy neighbour of `noisy_neighbour` "
        "(a private instance makes its own)",
    )
    bench.add_argument("--calls", type=int, default=0, help="warm executions per latency loop")
    bench.add_argument("--file-mib", type=int, default=0, help="size of the large file (MiB)")
    bench.add_argument("--out", default="", help="results directory (default: bench-results)")
    bench.add_argument(
        "--keep-home",
        action="store_true",
        help="keep the private instance's SHOAL_HOME (logs) afterwards",
    )
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bench.add_argument("--list", action="store_true", help="list the scenarios and exit")
    bench.set_defaults(func=_run)
    return bench


def _run(settings, args) -> int:
    from shoal.bench import runner

    return runner.main(settings, args)
