"""Subcommands: `tcpstates plugins` lists every stage with its options; `tcpstates doctor`."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import orjson

from tcpstates.api import Warner
from tcpstates.parsing import OneLineParser
from tcpstates.config import find_config
from tcpstates.doctor import doctor_command
from tcpstates.options import describe_options
from tcpstates.registry import make_plugin_manager
from tcpstates.runconfig import plugins_section
from tcpstates.text import escape_text


def _json(value: Any, option: int = 0) -> bytes:
    # a plugin's default may be any object (a Path, a set, a mapping by number):
    # shown as its text, never a crash of the whole listing
    return orjson.dumps(value, default=str, option=option | orjson.OPT_NON_STR_KEYS)


def _describe(opt: dict[str, Any]) -> str:
    default = _json(opt["default"]).decode()
    bounds = []
    if "choices" in opt:
        bounds.append("one of " + ", ".join(map(str, opt["choices"])))
    if "min" in opt or "max" in opt:
        bounds.append(f"{opt.get('min', '')}..{opt.get('max', '')}")
    extra = f" [{'; '.join(bounds)}]" if bounds else ""
    return f"    {opt['name']} = {default}  ({opt['type']}){extra} {opt['help']}"


def plugins_command(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="tcpstates plugins", description="list filters, enrichers, sinks and sources")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", metavar="PATH", help="config whose [plugins] disable list applies")
    args = p.parse_args(argv)
    config, _ = find_config(args.config)
    registry = make_plugin_manager(blocked=plugins_section(config).disable, warner=Warner())
    rows: list[dict[str, Any]] = []
    for info in registry.all():
        rows.append({"name": info.name, "kind": info.kind, "distribution": info.distribution,
                     "version": info.version, "description": info.description,
                     "options": describe_options(info.cls.Options)})
    if args.json:
        sys.stdout.buffer.write(_json(rows, orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.flush()
        return 0
    out = []
    for row in rows:
        # names, versions, descriptions and help come from installed
        # distributions' metadata and code: escaped like any text from outside
        out.append(escape_text(f"{row['name']} ({row['kind']}) from {row['distribution']} "
                               f"{row['version']}: {row['description']}"))
        out.extend(escape_text(_describe(opt)) for opt in row["options"])
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    return 0


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    return {"plugins": plugins_command, "doctor": doctor_command}[name](argv)
