"""Built-in filters (ports, family, state, duration, process, address) and bcc's
port flags -L and -D, which put the ports filter in front of the chain (pushed
into the kernel from there). The family flags -4/-6 are `family_flags.py`, a
plugin of their own so that `-h` lists the flags in bcc's order (-L -D -Y -4 -6)."""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.filters.filters import (
    AddressFilter,
    DurationFilter,
    FamilyFilter,
    PortsFilter,
    ProcessFilter,
    StateFilter,
)
from tcpstates.plugins.filters.ports import parse_port_list
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_filters(register: Any) -> None:
    for cls in (PortsFilter, FamilyFilter, StateFilter, DurationFilter, ProcessFilter, AddressFilter):
        register(cls)


def _ports(what: str) -> Any:
    def parse(text: str) -> frozenset[int]:
        try:
            return parse_port_list(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-L", "--localport", type=_ports("-L"), help="comma-separated list of local ports to trace.")
    parser.add_argument("-D", "--remoteport", type=_ports("-D"), help="comma-separated list of remote ports to trace.")


@hookimpl(tryfirst=True)
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.localport or args.remoteport:
        ports: dict[str, Any] = {}
        if args.localport:
            ports["local"] = sorted(args.localport)
        if args.remoteport:
            ports["remote"] = sorted(args.remoteport)
        config.prepend_chain("ports", "-L/-D", **ports)
