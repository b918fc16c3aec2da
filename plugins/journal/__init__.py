"""The `journal` sink (systemd-journald), bcc's -Y flag and the journal's doctor checks."""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.journal import doctor
from tcpstates.plugins.journal.sink import JournalSink
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(JournalSink)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-Y", "--journal", action="store_true",
                        help="log session state changes to the systemd journal")


@hookimpl
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.journal:
        config.add_sink("journal")


@hookimpl
def tcpstates_doctor_checks(register: Any) -> None:
    for check in doctor.checks():
        register(check)
