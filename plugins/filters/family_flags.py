"""bcc's -4/-6 flags: the `family` filter in front of the chain (pushed into the kernel)."""

from __future__ import annotations

import argparse

from tcpstates import hookimpl
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    fam = parser.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="trace IPv4 family only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="trace IPv6 family only")


@hookimpl(tryfirst=True)
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.ipv4 or args.ipv6:
        config.prepend_chain("family", "-4/-6", family="ipv4" if args.ipv4 else "ipv6")
