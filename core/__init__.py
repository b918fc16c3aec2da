"""tcpstates: trace TCP socket state changes with eBPF, through a plugin pipeline.

Everything a plugin author needs is importable from here:

    from tcpstates import (hookimpl, Source, Filter, Enricher, Sink, Event, TcpState,
                           option, ConfigError)

`tcpstates.testing` holds the helpers for plugin authors' tests.
"""

import sys as _sys

# `python -m tcpstates` puts the working directory first on sys.path, and this
# package is imported before any of our code runs: drop it now, before the
# imports below, so a root tool never imports argparse.py or tomllib.py lying
# where it was started. (The package itself cannot be protected from here: Python
# imports a planted tcpstates/ instead of this one. Root uses the script or
# `python -P -m`: docs/security.md.)
if _sys.argv[:1] == ["-m"] and not _sys.flags.safe_path:
    import os as _os

    _cwd = _os.getcwd()
    _sys.path[:] = [p for p in _sys.path if p not in ("", ".", _cwd)]

__version__ = "0.1.0"

from tcpstates.api import (  # noqa: E402
    Enricher,
    Filter,
    KernelConstraints,
    RunContext,
    Sink,
    Source,
)
from tcpstates.errors import ConfigError, UsageError, mark_written  # noqa: E402
from tcpstates.events import Event, TcpState, sanitize_text  # noqa: E402
from tcpstates.hookspecs import hookimpl  # noqa: E402
from tcpstates.options import NoOptions, option  # noqa: E402

__all__ = ["hookimpl", "Source", "Filter", "Enricher", "Sink", "Event", "TcpState", "option",
           "ConfigError", "UsageError", "NoOptions", "KernelConstraints", "RunContext",
           "sanitize_text", "mark_written", "__version__"]
