"""An installed-looking distribution on disk (a *.dist-info next to its
module), for plugin-loading tests that must not touch the real environment."""

from __future__ import annotations

import textwrap
from pathlib import Path

SINK_PLUGIN = """
from tcpstates.api import Sink
from tcpstates.hookspecs import hookimpl
class {cls}(Sink):
    name = "{name}"
    def write(self, batch): pass
@hookimpl
def tcpstates_register_sinks(register):
    register({cls})
"""


def sink_plugin(name: str) -> str:
    return SINK_PLUGIN.format(cls=name.capitalize(), name=name)


def fake_dist(root: Path, dist: str, version: str, module: str, source: str) -> None:
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[tcpstates]\n{module} = {module}\n")
