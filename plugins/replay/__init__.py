"""The `replay` source (recorded JSON Lines, no root) and its --replay flag."""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import UsageError, hookimpl
from tcpstates.plugins.replay.source import ReplaySource
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_sources(register: Any) -> None:
    register(ReplaySource)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replay", metavar="FILE", help="replay recorded JSON Lines ('-' for stdin) "
                        "instead of tracing; needs neither root nor bcc")


@hookimpl(tryfirst=True)   # the owner rule looks at whether the source is live
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.replay is not None:
        if args.replay == "":
            raise UsageError("--replay: empty path; give a .jsonl file or '-' for stdin")
        config.use_source("replay", "--replay", path=args.replay)
