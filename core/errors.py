"""Exceptions that end a run with one clear line on stderr and their `exit_status`:
2 for bad input (UsageError, ConfigError), 1 when the host cannot trace
(EnvironmentProblem) or a stage failed under --strict/on_error=fail (StageError)."""


class UsageError(Exception):
    """Bad input from the user: command line, config file, replay file.

    The message is a single line that says what is wrong and what to do.
    """

    exit_status = 2


class ConfigError(UsageError):
    """A config problem, named by its TOML path (e.g. `sinks.audit.path`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class EnvironmentProblem(Exception):
    """The machine cannot trace (not root, no bcc, no tracepoint, compile error).

    Exit status 1 by default: the input was fine, the host is not ready.
    """

    exit_status = 1


class StageError(Exception):
    """A stage failed at run time under the `fail` policy (or --strict)."""

    exit_status = 1


class SinkUnavailable(UsageError):
    """A sink's destination is missing or refused at run time (a sink failure
    handled by its on_error policy, unlike a configuration mistake)."""


# The attribute an error raised by Sink.write carries: how many events of the
# batch the sink's output holds. An attribute, not a wrapper exception, so the
# error keeps its own type (BrokenPipeError stays "the reader is gone").
_WRITTEN = "tcpstates_written"


def mark_written(exc: BaseException, events: int) -> BaseException:
    """Say, on the error a sink's `write(batch)` is about to raise, how many of
    the batch's first events its output already holds: the pipeline counts
    those as written and the rest as lost (the exit summary's "written" then
    equals what the file, journald or receiver holds). Returns `exc`."""
    try:
        setattr(exc, _WRITTEN, events)
    except (AttributeError, TypeError):   # an error that takes no attributes: counted as none written
        pass
    return exc


def written_before(exc: BaseException, batch: int) -> int:
    """How many events of a batch of `batch` a failed write delivered: what
    `mark_written` recorded, when it is a count within the batch; 0 otherwise."""
    done = getattr(exc, _WRITTEN, 0)
    return done if type(done) is int and 0 <= done <= batch else 0
