"""The command line: core flags, the flags every plugin contributes, subcommands.

    tcpstates [-h] [plugin flags: bcc's -T -t -w -s -L -D -Y -4 -6, --owner, ...]
              [--sink NAME]... [--config PATH] [-o KEY=VALUE]... [--strict] [--user NAME]
    tcpstates plugins [--json]
    tcpstates doctor

The core defines only the flags about the run itself; each plugin adds its own
through `tcpstates_add_options` and folds them into the run configuration
through `tcpstates_configure`. Bad input ends with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import sys
from typing import Any, NoReturn, Sequence

import tcpstates
from tcpstates import config as cfg
from tcpstates import interrupt
from tcpstates.api import REPORT_WAIT_S, RunContext, Warner
from tcpstates.commands import run_subcommand
from tcpstates.errors import EnvironmentProblem, StageError, UsageError
from tcpstates.parsing import OneLineParser

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


def _add_bootstrap_flags(p: argparse.ArgumentParser) -> None:
    """Flags needed before the plugins are loaded (they decide which and how)."""
    p.add_argument("--config", metavar="PATH", help="config file (default: $TCPSTATES_CONFIG, "
                   "~/.config/tcpstates/tcpstates.toml, /etc/tcpstates/tcpstates.toml)")
    p.add_argument("--strict", action="store_true", help="make plugin import failures, stage "
                   "errors and skipped replay records fatal")
    p.add_argument("--allow-insecure-config", action="store_true",
                   help="as root, accept a config file writable by others")
    p.add_argument("--allow-insecure-plugins", action="store_true",
                   help="as root, load plugins from locations writable by others")


def bootstrap_args(argv: Sequence[str]) -> argparse.Namespace:
    p = OneLineParser(prog="tcpstates", add_help=False)
    _add_bootstrap_flags(p)
    args, _rest = p.parse_known_args(argv)
    return args


def build_parser(registry: Any) -> OneLineParser:
    """The full parser: the core's flags and every loaded plugin's."""
    p = OneLineParser(prog="tcpstates", description="Trace TCP session state changes and durations",
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    try:
        registry.call("tcpstates_add_options", parser=p)
    except argparse.ArgumentError as exc:   # two plugins want the same flag
        raise UsageError(f"plugins define the same flag twice: {exc}") from None
    p.add_argument("--sink", action="append", metavar="NAME", default=None,
                   help="send events to this sink (repeatable): a sink type (text, csv, jsonl, "
                        "journal, ...) or a sink named in the config")
    _add_bootstrap_flags(p)
    p.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o sinks.text.wide=true (repeatable)")
    p.add_argument("--user", metavar="NAME", help="drop root to this user once the probe is "
                   "attached and the outputs are open (a small root process stays to reopen and rotate "
                   "those files, nothing else)")
    p.add_argument("--no-summary", action="store_true", help="do not print the exit summary on stderr")
    p.add_argument("--version", action="version", version=f"tcpstates {tcpstates.__version__}")
    return p


def load_registry(argv: Sequence[str], warner: Warner) -> tuple[Any, dict[str, Any], argparse.Namespace]:
    """Read the config named by the command line and load the plugins it allows."""
    from tcpstates.registry import make_plugin_manager
    from tcpstates.runconfig import plugins_section

    boot = bootstrap_args(argv)
    tree, _path = cfg.find_config(boot.config, allow_insecure=boot.allow_insecure_config)
    general = tree.get("tcpstates")
    strict = boot.strict or (isinstance(general, dict) and general.get("strict") is True)
    registry = make_plugin_manager(blocked=plugins_section(tree).disable, warner=warner, strict=strict,
                                   allow_insecure=boot.allow_insecure_plugins)
    return registry, tree, boot


def configure(args: argparse.Namespace, tree: dict[str, Any], registry: Any) -> Any:
    """The validated RunPlan: config file, then -o overrides, then every flag."""
    from tcpstates.runconfig import RunConfig

    for text in args.overrides:
        parts, value = cfg.parse_override(text)
        cfg.apply_override(tree, parts, value)
    config = RunConfig.load(tree, registry)
    if args.strict:
        config.make_strict()
    if args.sink is not None:
        config.set_sinks(args.sink, where="--sink")
    registry.call("tcpstates_configure", config=config, args=args)
    return config.finish()


def install_signals(pipeline: Any) -> int:
    """SIGINT/SIGTERM: stop and drain; SIGHUP: reopen files; SIGUSR1: print
    the summary now. Returns a wake-up fd."""

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    interrupt.install()

    stops = []

    def stop(signum: int, frame: Any) -> None:
        stops.append(signum)
        if len(stops) > 1:
            # the first one did not end the run: something is blocked for good
            # (every wait of our own ends at the first). The usual "press
            # Ctrl-C again", and what systemd's second SIGTERM is for.
            raise interrupt.ForcedStop(signum)
        pipeline.stopping = True
        interrupt.request()   # ends any wait on a slow consumer or input

    def hup(signum: int, frame: Any) -> None:
        pipeline.reopen_requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    def usr1(signum: int, frame: Any) -> None:
        pipeline.report_requested = True

    signal.signal(signal.SIGHUP, hup)
    signal.signal(signal.SIGUSR1, usr1)
    return r


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 8 << 20    # a batch's buffers (output text, lists) stay below this
TRIM_THRESHOLD = 32 << 20   # free heap kept for the next batch instead of returned


def tune_memory() -> None:
    """Process-wide choices for the per-batch hot path, so they belong to the
    command line, never to library code.

    Events are many short-lived small containers, almost never cyclic:
    collect the young generation rarely, and move everything built at
    start-up (plugins, caches) out of the collector's way.

    Every batch allocates and frees the same few large buffers (a sink's
    output text is hundreds of KiB). glibc serves those from fresh mmap()s
    and returns them at once, so each batch paid a page fault per 4 KiB
    (measured: 70 minor faults per 1,000 events in a storm, 9 with this):
    fixed thresholds keep them on the heap and the heap's free memory for
    the next batch. Only glibc has mallopt; elsewhere nothing changes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def run(argv: Sequence[str]) -> int:
    from tcpstates.notify import Notifier
    from tcpstates.outputs import start_opener, stop_opener
    from tcpstates.pipeline import summary_line
    from tcpstates.security import drop_privileges, lookup_user
    from tcpstates.session import build_pipeline, execute

    warner = Warner()
    try:
        registry, tree, _boot = load_registry(argv, warner)
    except UsageError:
        # -h and --version answer even when the config is broken or unreadable
        if not any(a in ("-h", "--help", "--version") for a in argv):
            raise
        from tcpstates.registry import make_plugin_manager
        registry, tree = make_plugin_manager(warner=warner), {}
    args = build_parser(registry).parse_args(argv)
    if args.user is not None:
        lookup_user(args.user)
    plan = configure(args, tree, registry)
    context = RunContext(strict=plan.strict, warner=warner, drop_user=args.user or "")
    pipeline = build_pipeline(plan, context)
    pipeline.source.wakeup_fd(install_signals(pipeline))
    notifier = Notifier()

    def started() -> None:
        if args.user:
            if os.geteuid() == 0:
                # the one process that stays root: reopens (SIGHUP) and rotations
                # of the files opened so far, which the user could not make
                try:
                    start_opener()
                except OSError as exc:
                    raise EnvironmentProblem(f"--user: cannot start the privileged opener "
                                             f"({exc.strerror}); leave --user out") from None
            drop_privileges(args.user)
        tune_memory()
        notifier.notify(f"READY=1\nSTATUS={pipeline.source.status()}")

    try:
        summary = execute(pipeline, registry, context, on_started=started)
    finally:
        stop_opener()

    def summary_text() -> str:
        line = summary_line(summary)[len("tcpstates: "):]
        if warner.dropped:
            # said once at the end, if stderr has room by then: what was not said
            line += f"; {warner.dropped} warnings not shown (stderr was a full pipe)"
        return line

    if pipeline.broken_pipes:
        # a shipper reading our JSON Lines went away: events would be lost from here
        written = ", ".join(f"{n} {summary['written'].get(n, 0)}" for n in pipeline.broken_pipes)
        warner.warn(f"error: the reader of sink {', '.join(pipeline.broken_pipes)} closed the pipe "
                    f"(EPIPE) after {written} events; stopping, since everything after would be lost")
        warner.warn(summary_text(), whole=True)
        return 1
    if pipeline.every_sink_failed(summary):
        # nothing reached its destination: not a success, whatever --no-summary says
        how = "; ".join(pipeline.failed_sinks(summary).values())
        warner.warn(f"error: every sink failed ({how}); see the warnings above")
        warner.warn(summary_text(), whole=True)
        return 1
    # `tcpstates | head -3`: the reader of the table left on purpose; exit quietly.
    if not args.no_summary and not pipeline.readers_gone:
        warner.warn(summary_text(), whole=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tcpstates import stdio
    stdio.guard()   # before anything opens a file that could land on a closed fd 0/1/2
    stdio.prepare_stderr()   # stderr's non-blocking twin, while /proc/self/fd is ours to open
    from tcpstates.security import sanitize_sys_path
    sanitize_sys_path()
    try:
        return _main(argv)
    finally:
        stdio.settle()


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return run_subcommand(argv[0], argv[1:])
        return run(argv)
    except BrokenPipeError:   # `tcpstates plugins | head -1`: the reader left on purpose
        _quiet_stdout()
        return 0
    except UsageError as exc:
        _fatal(f"error: {exc}", exc.exit_status)
    except EnvironmentProblem as exc:
        _fatal(f"error: {exc}", exc.exit_status)
    except StageError as exc:
        _fatal(f"error: {exc}; --strict or on_error=fail ended the run", exc.exit_status)
    except interrupt.StopRequested:
        # SIGINT/SIGTERM while the source attached (the BPF compile): a stop,
        # not a failure; nothing was traced, so there is no summary to give
        Warner().write_block("tcpstates: stopped before tracing began; nothing was traced\n",
                             timeout=REPORT_WAIT_S)
        return 0
    except KeyboardInterrupt:
        return 130
    except interrupt.ForcedStop as exc:
        _fatal(f"stopped at once by a second {signal.Signals(exc.signum).name}{_blocked_in(exc)}; "
               f"no summary (events in flight are lost)", 128 + exc.signum)
    except Exception as exc:   # a bug: still one line, the traceback on request
        if os.environ.get("TCPSTATES_DEBUG"):
            raise
        _fatal(f"internal error: {type(exc).__name__}: {exc} (rerun with TCPSTATES_DEBUG=1 "
               f"for the traceback and report it)", 1)
    return 0


def _blocked_in(exc: BaseException) -> str:
    """Which stage the forced stop found blocked (the deepest frame of a stage method)."""
    from tcpstates.api import Stage
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Stage):
            found = f" while the {type(owner).name} stage was blocked in {tb.tb_frame.f_code.co_name}()"
        tb = tb.tb_next
    return found


def _quiet_stdout() -> None:
    # Python flushes sys.stdout at exit; after EPIPE that would print a traceback.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def _fatal(message: str, status: int) -> NoReturn:
    from tcpstates.text import escape_text
    # an error may quote a path or value from outside: never raw control
    # characters; and a stderr nobody reads must not keep us from exiting
    # (the signal handlers are still ours: SIGTERM could not end that wait)
    Warner().write_block(f"tcpstates: {escape_text(message)}\n", timeout=REPORT_WAIT_S)
    raise SystemExit(status)
