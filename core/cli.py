"""The command line: bcc tcpstates' flags plus sinks, config, replay and subcommands.

    tcpstates [-h] [-T] [-t] [-w] [-s] [-L PORTS] [-D PORTS] [-Y] [-4 | -6]
              [--sink NAME]... [--config PATH] [-o KEY=VALUE]... [--replay FILE]
    tcpstates plugins [--json]

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, NoReturn, Sequence

import tcpstates
from tcpstates import config as cfg
from tcpstates.api import RunContext, Warner
from tcpstates.errors import EnvironmentProblem, StageError, UsageError
from tcpstates.ports import parse_port_list

EXAMPLES = """examples:
    ./tcpstates           # trace all TCP state changes
    ./tcpstates -t        # include timestamp column
    ./tcpstates -T        # include time column (HH:MM:SS)
    ./tcpstates -w        # wider columns (fit IPv6)
    ./tcpstates -stT      # csv output, with times & timestamps
    ./tcpstates -Y        # log events to the systemd journal
    ./tcpstates -L 80     # only trace local port 80
    ./tcpstates -L 80,81  # only trace local ports 80 and 81
    ./tcpstates -D 80     # only trace remote port 80
    ./tcpstates -4        # trace IPv4 family only
    ./tcpstates -6        # trace IPv6 family only
    ./tcpstates --sink jsonl --sink journal     # JSON Lines on stdout and the journal
    ./tcpstates --replay trace.jsonl -s         # re-process a recording, no root needed
    ./tcpstates plugins                         # list filters, enrichers, sinks, sources
"""

SUBCOMMANDS = ("plugins", "doctor")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (usage stays available with -h)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} -h')")


def _ports(what: str) -> Any:
    def parse(text: str) -> frozenset[int]:
        try:
            return parse_port_list(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="tcpstates", description="Trace TCP session state changes and durations",
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("-T", "--time", action="store_true", help="include time column on output (HH:MM:SS)")
    p.add_argument("-t", "--timestamp", action="store_true", help="include timestamp on output (seconds)")
    p.add_argument("-w", "--wide", action="store_true", help="wide column output (fits IPv6 addresses)")
    p.add_argument("-s", "--csv", action="store_true", help="comma separated values output")
    p.add_argument("-L", "--localport", type=_ports("-L"), help="comma-separated list of local ports to trace.")
    p.add_argument("-D", "--remoteport", type=_ports("-D"), help="comma-separated list of remote ports to trace.")
    p.add_argument("-Y", "--journal", action="store_true", help="log session state changes to the systemd journal")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="trace IPv4 family only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="trace IPv6 family only")
    p.add_argument("--owner", action="store_true", help="name the process owning each socket "
                   "(O-PID/O-COMM columns), not only the on-CPU one (C-PID/C-COMM)")
    p.add_argument("--summary", action="store_true", help="at exit and on SIGUSR1, print log2 "
                   "histograms of the time spent in each state and the busiest ports (stderr)")
    p.add_argument("--sink", action="append", metavar="NAME", default=None,
                   help="send events to this sink (repeatable): a sink type (text, csv, jsonl, "
                        "journal, ...) or a sink named in the config")
    p.add_argument("--config", metavar="PATH", help="config file (default: $TCPSTATES_CONFIG, "
                   "~/.config/tcpstates/tcpstates.toml, /etc/tcpstates/tcpstates.toml)")
    p.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o sinks.text.wide=true (repeatable)")
    p.add_argument("--replay", metavar="FILE", help="replay recorded JSON Lines ('-' for stdin) "
                   "instead of tracing; needs neither root nor bcc")
    p.add_argument("--strict", action="store_true", help="make plugin import failures, stage "
                   "errors and skipped replay records fatal")
    p.add_argument("--allow-insecure-config", action="store_true",
                   help="as root, accept a config file writable by others")
    p.add_argument("--allow-insecure-plugins", action="store_true",
                   help="as root, load plugins from locations writable by others")
    p.add_argument("--user", metavar="NAME", help="drop root to this user once the probe is "
                   "attached and the outputs are open (files are not reopened afterwards as root)")
    p.add_argument("--no-summary", action="store_true", help="do not print the exit summary on stderr")
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"tcpstates {tcpstates.__version__}")
    return p


def _sink_table(config: dict[str, Any], name: str) -> dict[str, Any]:
    sinks = config.setdefault("sinks", {})
    if not isinstance(sinks, dict):
        raise UsageError("sinks: expected a table")
    table = sinks.setdefault(name, {})
    if not isinstance(table, dict):
        raise UsageError(f"sinks.{name}: expected a table")
    return table


def _sink_type(config: dict[str, Any], name: str) -> str:
    table = config.get("sinks", {}).get(name) if isinstance(config.get("sinks"), dict) else None
    return table.get("type", name) if isinstance(table, dict) else name


def apply_flags(args: argparse.Namespace, config: dict[str, Any], general: cfg.General,
                registry: Any) -> list[str]:
    """Fold bcc's flags into the config; returns the active sink names."""
    where = "--sink" if args.sink is not None else "tcpstates.sinks"
    names: list[str] = []
    for name in args.sink if args.sink is not None else general.sinks:
        if not name:
            raise UsageError(f"{where}: empty sink name; e.g. text")
        if name in names:
            raise UsageError(f"{where}: sink {name!r} given twice; name each sink once")
        names.append(name)
    if args.csv:
        if "text" in names:
            names[names.index("text")] = "csv"
        elif "csv" not in names:
            names.append("csv")
    if args.journal and "journal" not in names:
        names.append("journal")
    if args.summary and "summary" not in names:
        names.append("summary")
    if not names:
        raise UsageError("no sinks: give --sink NAME or set tcpstates.sinks in the config")
    for name in names:
        info = registry.get("sink", _sink_type(config, name))
        if info is None:
            continue   # reported with its config path by sink_spec
        fields = {f for f in getattr(info.cls.Options, "__dataclass_fields__", {})}
        # -T -t -w --owner set the option of the same name on every sink that has it
        for flag in ("time", "timestamp", "wide", "owner"):
            if getattr(args, flag) and flag in fields:
                _sink_table(config, name)[flag] = True
    chain = config.get("chain", [])
    if not isinstance(chain, list):
        raise UsageError("chain: expected an array of tables ([[chain]])")
    front = []
    if args.localport or args.remoteport:
        entry: dict[str, Any] = {"use": "ports"}
        if args.localport:
            entry["local"] = sorted(args.localport)
        if args.remoteport:
            entry["remote"] = sorted(args.remoteport)
        front.append(entry)
    if args.ipv4 or args.ipv6:
        front.append({"use": "family", "family": "ipv4" if args.ipv4 else "ipv6"})
    uses = {e.get("use") for e in chain if isinstance(e, dict)}
    bcc_tables = {"text", "csv", "summary"}
    structured = any(_sink_type(config, n) not in bcc_tables for n in names)
    live = args.replay is None and general.source == "kernel"
    # a recording keeps the owner fields it was made with; tracking owners of
    # replayed events against this machine's /proc would be wrong
    if "owner" not in uses and live and (general.owner == "on" or args.owner or
                                         (general.owner == "auto" and structured)):
        front.append({"use": "owner"})
    config["chain"] = front + chain
    if args.replay is not None:
        if args.replay == "":
            raise UsageError("--replay: empty path; give a .jsonl file or '-' for stdin")
        config.setdefault("tcpstates", {})["source"] = "replay"
        sources = config.setdefault("sources", {})
        sources.setdefault("replay", {})["path"] = args.replay
    return names


def print_ebpf() -> int:
    from tcpstates.kernel_probe import bpf_source_dir
    d = bpf_source_dir()
    sys.stdout.write((d / "tcpstates.h").read_text() + (d / "tcpstates.bpf.c").read_text())
    return 0


def install_signals(pipeline: Any) -> int:
    """SIGINT/SIGTERM: stop and drain; SIGHUP: reopen files; SIGUSR1: print
    the summary now. Returns a wake-up fd."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def stop(signum: int, frame: Any) -> None:
        pipeline.stopping = True

    def hup(signum: int, frame: Any) -> None:
        pipeline.reopen_requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    def usr1(signum: int, frame: Any) -> None:
        pipeline.report_requested = True

    signal.signal(signal.SIGHUP, hup)
    signal.signal(signal.SIGUSR1, usr1)
    return r


def run(argv: Sequence[str]) -> int:
    from tcpstates.notify import Notifier
    from tcpstates.pipeline import summary_line
    from tcpstates.registry import make_plugin_manager
    from tcpstates.security import drop_privileges
    from tcpstates.session import build_pipeline, execute

    args = build_parser().parse_args(argv)
    if args.ebpf:
        return print_ebpf()
    if args.user is not None and not args.user:
        raise UsageError("--user: empty name")
    config, _path = cfg.find_config(args.config, allow_insecure=args.allow_insecure_config)
    for text in args.overrides:
        parts, value = cfg.parse_override(text)
        cfg.apply_override(config, parts, value)
    general = cfg.general_section(config)
    plugins = cfg.plugins_section(config)
    strict = args.strict or general.strict
    warner = Warner()
    registry = make_plugin_manager(blocked=plugins.disable, warner=warner, strict=strict,
                                   allow_insecure=args.allow_insecure_plugins)
    cfg.validate_as_written(config, registry)
    sink_names = apply_flags(args, config, general, registry)
    context = RunContext(strict=strict, warner=warner)
    pipeline = build_pipeline(config, registry, context, sink_names)
    pipeline.source.wakeup_fd(install_signals(pipeline))
    notifier = Notifier()

    def started() -> None:
        if args.user:
            drop_privileges(args.user)
        notifier.notify(f"READY=1\nSTATUS={pipeline.source.status()}")

    summary = execute(pipeline, registry, context, on_started=started)
    # `tcpstates | head -3`: the reader left on purpose; exit quietly.
    if not args.no_summary and not pipeline.readers_gone:
        warner.warn(summary_line(summary)[len("tcpstates: "):])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tcpstates.security import sanitize_sys_path
    sanitize_sys_path()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from tcpstates.commands import run_subcommand
            return run_subcommand(argv[0], argv[1:])
        return run(argv)
    except UsageError as exc:
        _fatal(f"error: {exc}", exc.exit_status)
    except EnvironmentProblem as exc:
        _fatal(f"error: {exc}", exc.exit_status)
    except StageError as exc:
        _fatal(f"error: {exc}; --strict or on_error=fail ended the run", exc.exit_status)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:   # a bug: still one line, the traceback on request
        if os.environ.get("TCPSTATES_DEBUG"):
            raise
        _fatal(f"internal error: {type(exc).__name__}: {exc} (rerun with TCPSTATES_DEBUG=1 "
               f"for the traceback and report it)", 1)
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    return 0


def _quiet_stdout() -> None:
    # Python flushes sys.stdout at exit; after EPIPE that would print a traceback.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def _fatal(message: str, status: int) -> NoReturn:
    try:
        sys.stderr.write(f"tcpstates: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    raise SystemExit(status)
