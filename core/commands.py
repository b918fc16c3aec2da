"""Subcommands: `tcpstates plugins` lists every stage with its options."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import orjson

from tcpstates.api import Warner
from tcpstates.options import describe_options


def plugins_command(argv: Sequence[str]) -> int:
    from tcpstates.cli import OneLineParser
    from tcpstates.config import find_config, plugins_section
    from tcpstates.registry import make_plugin_manager

    p = OneLineParser(prog="tcpstates plugins", description="list filters, enrichers, sinks and sources")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", metavar="PATH", help="config whose [plugins] disable list applies")
    args = p.parse_args(argv)
    config, _ = find_config(args.config)
    disabled = plugins_section(config).disable
    registry = make_plugin_manager(blocked=disabled, warner=Warner())
    rows: list[dict[str, Any]] = []
    for info in registry.all():
        rows.append({"name": info.name, "kind": info.kind, "distribution": info.distribution,
                     "version": info.version, "description": info.description,
                     "options": describe_options(info.cls.Options)})
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    out = []
    for row in rows:
        out.append(f"{row['name']} ({row['kind']}) from {row['distribution']} {row['version']}: "
                   f"{row['description']}")
        for opt in row["options"]:
            default = orjson.dumps(opt["default"]).decode()
            out.append(f"    {opt['name']} = {default}  ({opt['type']}) {opt['help']}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    from tcpstates.doctor import doctor_command
    return {"plugins": plugins_command, "doctor": doctor_command}[name](argv)
