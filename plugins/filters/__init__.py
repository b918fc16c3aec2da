"""Built-in filters (ports, family, state, duration, process, address) and bcc's
filter flags -L, -D, -4 and -6, which put the ports and family filters in
front of the chain (pushed into the kernel from there)."""

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
    fam = parser.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="trace IPv4 family only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="trace IPv6 family only")


@hookimpl(tryfirst=True)
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.localport or args.remoteport:
        ports: dict[str, Any] = {}
        if args.localport:
            ports["local"] = sorted(args.localport)
        if args.remoteport:
            ports["remote"] = sorted(args.remoteport)
        config.prepend_chain("ports", "-L/-D", **ports)
    if args.ipv4 or args.ipv6:
        config.prepend_chain("family", "-4/-6", family="ipv4" if args.ipv4 else "ipv6")
