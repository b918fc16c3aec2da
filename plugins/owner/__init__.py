"""The `owner` enricher, its --owner flag and the rule that structured sinks get it.

`[tcpstates] owner = "auto" | "on" | "off"` (this plugin's own setting): auto
turns the enricher on when a sink that writes every field (JSON Lines, the
journal, forward: `Sink.structured`) is active, or with --owner; never for a
replay, whose recording keeps the owner fields it was made with.
"""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import Sink, hookimpl
from tcpstates.plugins.owner.enricher import OwnerEnricher
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_enrichers(register: Any) -> None:
    register(OwnerEnricher)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owner", action="store_true", help="name the process owning each socket "
                        "(O-PID/O-COMM columns), not only the on-CPU one (C-PID/C-COMM)")


@hookimpl(trylast=True)   # after every plugin has added its sinks
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    mode = config.setting("owner", "auto", choices=("auto", "on", "off"))
    if config.uses("owner") or not config.source_is_live():
        return
    structured = any(issubclass(spec.cls, Sink) and spec.cls.structured for spec in config.sink_specs())
    if mode == "on" or args.owner or (mode == "auto" and structured):
        config.prepend_chain("owner", "--owner")


@hookimpl
def tcpstates_doctor_checks(register: Any) -> None:
    from tcpstates.plugins.owner import doctor
    for check in doctor.checks():
        register(check)
