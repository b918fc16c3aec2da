"""bcc's table: the `text` and `csv` sinks and bcc's output flags -T -t -w -s."""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.bcc_table.sinks import CsvSink, TextSink
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(TextSink)
    register(CsvSink)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-T", "--time", action="store_true", help="include time column on output (HH:MM:SS)")
    parser.add_argument("-t", "--timestamp", action="store_true", help="include timestamp on output (seconds)")
    parser.add_argument("-w", "--wide", action="store_true", help="wide column output (fits IPv6 addresses)")
    parser.add_argument("-s", "--csv", action="store_true", help="comma separated values output")


@hookimpl(tryfirst=True)
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.csv:
        if config.has_sink("text"):
            config.replace_sink("text", "csv")
        elif not config.has_sink("csv"):
            config.add_sink("csv")
    # --owner belongs to the owner plugin; the table's O-PID/O-COMM columns to us
    owner = getattr(args, "owner", False)
    for spec in config.sink_specs():
        if not issubclass(spec.cls, (TextSink, CsvSink)):
            continue
        changes = {flag: True for flag, on in (("time", args.time), ("timestamp", args.timestamp),
                                               ("wide", args.wide), ("owner", owner))
                   if on and hasattr(spec.options, flag)}
        if changes:
            config.set_sink_options(spec.name, **changes)
