"""The `summary` sink (log2 histograms at exit and on SIGUSR1) and its --summary flag."""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.summary.sink import SummarySink
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(SummarySink)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", action="store_true", help="at exit and on SIGUSR1, print log2 "
                        "histograms of the time spent in each state and the busiest ports (stderr)")


@hookimpl
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.summary:
        config.add_sink("summary")
