"""argparse with one-line errors, shared by the command line and its subcommands."""

from __future__ import annotations

import argparse
from typing import NoReturn

from tcpstates.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (usage stays available with -h)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} -h')")
