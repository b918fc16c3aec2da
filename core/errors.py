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
