"""tcpstates.toml: finding, reading, overriding and validating the config.

Precedence: command-line flags > `-o key=value` overrides > config file >
built-in defaults. The file is plain TOML:

    [tcpstates]        general settings (active sinks, strict, source)
    [plugins]          disable = [...] stage or distribution names
    [sources.NAME]     options of a source (kernel, replay)
    [[chain]]          ordered filters and enrichers: use = "NAME", options...
    [sinks.NAME]       named sinks: type = "TYPE" (default NAME), options...

Every problem is a ConfigError naming its TOML path.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from tcpstates.errors import ConfigError, UsageError
from tcpstates.options import build_options

CONFIG_ENV = "TCPSTATES_CONFIG"


def default_search_path() -> list[Path]:
    """Where a config is looked for when --config is not given.

    $TCPSTATES_CONFIG, then $XDG_CONFIG_HOME/tcpstates/tcpstates.toml
    (~/.config/...), then /etc/tcpstates/tcpstates.toml. Never the current
    directory: a root tool must not pick up whatever file lies where it runs.
    """
    paths = []
    env = os.environ.get(CONFIG_ENV)
    if env:
        paths.append(Path(env))
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    paths.append(Path(xdg) / "tcpstates" / "tcpstates.toml")
    paths.append(Path("/etc/tcpstates/tcpstates.toml"))
    return paths


def _check_owner(path: Path, allow_insecure: bool) -> None:
    """As root, refuse a file others could have written (as sshd and sudo do)."""
    from tcpstates.security import writable_by_others

    if os.geteuid() != 0 or allow_insecure:
        return
    bad = writable_by_others(path)
    if bad is not None:
        st = bad.stat()
        raise UsageError(
            f"{path}: refusing to read as root because {bad} is writable by someone other "
            f"than root (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}); fix it with "
            f"'chown root {bad} && chmod go-w {bad}', or pass --allow-insecure-config")


def read_config_file(path: Path, *, allow_insecure: bool = False) -> dict[str, Any]:
    try:
        if path.is_dir():
            raise UsageError(f"{path}: is a directory, not a config file; pass a .toml file to --config")
        _check_owner(path, allow_insecure)
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found; check the --config path") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the config file (permission denied)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 at byte {exc.start}; save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: malformed TOML: {exc}") from None


def find_config(explicit: str | None, *, allow_insecure: bool = False) -> tuple[dict[str, Any], Path | None]:
    if explicit is not None:
        if explicit == "":
            raise UsageError("--config: empty path; give the path of a .toml file")
        path = Path(explicit)
        return read_config_file(path, allow_insecure=allow_insecure), path
    for path in default_search_path():
        if path.exists():
            return read_config_file(path, allow_insecure=allow_insecure), path
    return {}, None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`-o sinks.audit.path=/tmp/a.jsonl` → (["sinks","audit","path"], "/tmp/a.jsonl").

    The value is read as a TOML value when it parses as one (numbers,
    booleans, arrays, quoted strings), otherwise taken as a bare string.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"-o {text!r}: expected KEY=VALUE, e.g. -o sinks.text.wide=true")
    parts = key.split(".")
    if any(not p for p in parts):
        raise UsageError(f"-o {text!r}: empty component in key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_override(config: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = config
    # [[chain]] entries are addressed by index: -o chain.0.min_ms=100
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UsageError(f"-o {'.'.join(parts)}: {where} is not an existing index")
            node = node[int(part)]
        else:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, (dict, list)):
                raise UsageError(f"-o {'.'.join(parts)}: {where} is a value, not a table")
            node = nxt
    if isinstance(node, list):
        raise UsageError(f"-o {'.'.join(parts)}: cannot set a value on an array")
    node[parts[-1]] = value


@dataclasses.dataclass
class General:
    sinks: list[str] = dataclasses.field(default_factory=lambda: ["text"])
    source: str = "kernel"
    strict: bool = False
    # owner enricher: "auto" = on when a structured sink (jsonl, journal,
    # forward, ...) is active or --owner is given; "on"; "off"
    owner: str = "auto"

    def validate(self) -> None:
        if self.owner not in ("auto", "on", "off"):
            raise ValueError(f"owner: expected auto, on or off, got {self.owner!r}")


@dataclasses.dataclass
class PluginsSection:
    disable: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageSpec:
    """One configured stage: which class, its options, its error policy."""

    label: str            # TOML path used in messages, e.g. "chain[2]" or "sinks.audit"
    name: str             # instance name (sink name, or stage name for the chain)
    info: Any             # registry.StageInfo
    options: Any
    on_error: str


TOP_LEVEL = {"tcpstates", "plugins", "sources", "chain", "sinks"}


def _table(config: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(path, "expected a table")
    return value


def general_section(config: dict[str, Any]) -> General:
    unknown = set(config) - TOP_LEVEL
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(key, f"unknown section (valid: {', '.join(sorted(TOP_LEVEL))})")
    return build_options(General, _table(config, "tcpstates", "tcpstates"), "tcpstates")


def plugins_section(config: dict[str, Any]) -> PluginsSection:
    return build_options(PluginsSection, _table(config, "plugins", "plugins"), "plugins")


def _policy(table: dict[str, Any], path: str, cls: type, allowed: tuple[str, ...]) -> str:
    value = table.pop("on_error", getattr(cls, "default_on_error", "skip"))
    if value not in allowed:
        raise ConfigError(f"{path}.on_error", f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def source_spec(config: dict[str, Any], registry: Any, name: str) -> StageSpec:
    sources = _table(config, "sources", "sources")
    for key, table in sources.items():
        other = registry.get("source", key)
        if other is None:
            raise ConfigError(f"sources.{key}", f"unknown source (available: {', '.join(registry.names('source'))})")
        if not isinstance(table, dict):
            raise ConfigError(f"sources.{key}", "expected a table")
        build_options(other.cls.Options, dict(table), f"sources.{key}")   # inactive ones too
    info = registry.get("source", name)
    if info is None:
        raise ConfigError("tcpstates.source", f"unknown source {name!r} (available: {', '.join(registry.names('source'))})")
    table = sources.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"sources.{name}", "expected a table")
    options = build_options(info.cls.Options, dict(table), f"sources.{name}")
    return StageSpec(f"sources.{name}", name, info, options, "fail")


def chain_specs(config: dict[str, Any], registry: Any) -> list[StageSpec]:
    from tcpstates.api import FILTER_POLICIES

    chain = config.get("chain", [])
    if not isinstance(chain, list):
        raise ConfigError("chain", "expected an array of tables ([[chain]])")
    specs: list[StageSpec] = []
    for i, entry in enumerate(chain):
        path = f"chain[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(path, "expected a table with use = \"NAME\"")
        table = dict(entry)
        name = table.pop("use", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.use", "missing: name the filter or enricher to use")
        info = registry.find(name, ("filter", "enricher"))
        both = registry.get("filter", name), registry.get("enricher", name)
        if all(both):
            raise ConfigError(f"{path}.use", f"{name!r} is both a filter ({both[0].distribution}) and "
                              f"an enricher ({both[1].distribution}); disable one in [plugins]")
        if info is None:
            avail = registry.names("filter") + registry.names("enricher")
            raise ConfigError(f"{path}.use", f"unknown filter or enricher {name!r} "
                              f"(available: {', '.join(sorted(avail))}; see 'tcpstates plugins')")
        on_error = _policy(table, path, info.cls, FILTER_POLICIES)
        options = build_options(info.cls.Options, table, path)
        # a stage that needs another's fields (container needs owner) gets it
        # inserted just before it, with default options, if the chain lacks it
        for need in getattr(info.cls, "requires", ()):
            if not any(s.name == need for s in specs):
                dep = registry.find(need, ("enricher", "filter"))
                if dep is None:
                    raise ConfigError(f"{path}.use", f"{name!r} needs {need!r}, which is disabled or "
                                      f"not installed")
                specs.append(StageSpec(f"{path}(needs {need})", need, dep,
                                       build_options(dep.cls.Options, {}, f"{path}(needs {need})"),
                                       dep.cls.default_on_error))
        specs.append(StageSpec(path, name, info, options, on_error))
    return specs


def sink_spec(config: dict[str, Any], registry: Any, name: str) -> StageSpec:
    from tcpstates.api import SINK_POLICIES

    sinks = _table(config, "sinks", "sinks")
    table = sinks.get(name)
    path = f"sinks.{name}"
    if table is None:
        table = {}
    elif not isinstance(table, dict):
        raise ConfigError(path, "expected a table")
    table = dict(table)
    type_name = table.pop("type", name)
    if not isinstance(type_name, str):
        raise ConfigError(f"{path}.type", "expected a string")
    info = registry.get("sink", type_name)
    if info is None:
        where = f"{path}.type" if name in sinks else "--sink"
        raise ConfigError(where, f"unknown sink {type_name!r} (available: "
                          f"{', '.join(registry.names('sink'))}; named sinks from the config: "
                          f"{', '.join(sorted(sinks)) or 'none'})")
    on_error = _policy(table, path, info.cls, SINK_POLICIES)
    options = build_options(info.cls.Options, table, path)
    return StageSpec(path, name, info, options, on_error)


def validate_all_sinks(config: dict[str, Any], registry: Any) -> None:
    """Check every [sinks.*] table, active or not, so typos surface early."""
    for name in _table(config, "sinks", "sinks"):
        sink_spec(config, registry, name)


def validate_as_written(config: dict[str, Any], registry: Any) -> None:
    """Check the file (+ -o overrides) before command-line flags change it,
    so a bad value is an error even where a flag would override it."""
    general = general_section(config)
    source_spec(config, registry, general.source)
    chain_specs(config, registry)
    validate_all_sinks(config, registry)
