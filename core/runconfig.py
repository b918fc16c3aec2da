"""The run configuration: the config file's tables, validated once into typed stage specs.

    [tcpstates]        general settings (active sinks, strict, source; keys plugins claim)
    [plugins]          disable = [...] stage or distribution names
    [sources.NAME]     options of a source (kernel, replay)
    [[chain]]          ordered filters and enrichers: use = "NAME", options...
    [sinks.NAME]       named sinks: type = "TYPE" (default NAME), options...

`RunConfig.load` checks every table (active or not, so a typo surfaces even
where a flag would override it) and builds each stage's options once. Plugins
then fold their flags in through the `tcpstates_configure` hook, using the
methods below; each change is validated where it is made. `finish()` yields
what the pipeline is built from. Every problem is a ConfigError naming its
TOML path (or the flag).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

from tcpstates.api import FILTER_POLICIES, SINK_POLICIES, Source, Stage
from tcpstates.errors import ConfigError, UsageError
from tcpstates.options import build_options

if TYPE_CHECKING:
    from tcpstates.registry import Registry, StageInfo

TOP_LEVEL = ("tcpstates", "plugins", "sources", "chain", "sinks")


@dataclasses.dataclass
class General:
    """The core's own [tcpstates] keys; plugins may claim more (`RunConfig.setting`)."""

    sinks: list[str] = dataclasses.field(default_factory=lambda: ["text"])
    source: str = "kernel"
    strict: bool = False


@dataclasses.dataclass
class PluginsSection:
    disable: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageSpec:
    """One configured stage: which class, its validated options, its error policy."""

    label: str            # TOML path used in messages, e.g. "chain[2]" or "sinks.audit"
    name: str             # instance name (sink name, or stage name for the chain)
    info: StageInfo
    options: Any
    on_error: str
    table: dict[str, Any] = dataclasses.field(default_factory=dict)   # as written, minus type/on_error

    @property
    def cls(self) -> type[Stage]:
        return self.info.cls


@dataclasses.dataclass
class RunPlan:
    """What the pipeline is built from."""

    source: StageSpec
    chain: list[StageSpec]
    sinks: list[StageSpec]
    strict: bool


def _table(config: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(path, "expected a table")
    return value


def plugins_section(config: dict[str, Any]) -> PluginsSection:
    """[plugins] alone: needed before the registry (and so the rest) exists."""
    return build_options(PluginsSection, _table(config, "plugins", "plugins"), "plugins")


def _policy(table: dict[str, Any], path: str, cls: type, allowed: tuple[str, ...]) -> str:
    value = table.pop("on_error", getattr(cls, "default_on_error", "skip"))
    if value not in allowed:
        raise ConfigError(f"{path}.on_error", f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


class RunConfig:
    """The validated configuration of one run; plugins change it through its methods."""

    def __init__(self, tree: dict[str, Any], registry: Registry) -> None:
        self.registry = registry
        unknown = set(tree) - set(TOP_LEVEL)
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown section (valid: {', '.join(sorted(TOP_LEVEL))})")
        general_table = dict(_table(tree, "tcpstates", "tcpstates"))
        own = {f.name for f in dataclasses.fields(General)}
        # keys the core does not know are left for plugins to claim (`setting`)
        self._unclaimed = {k: v for k, v in general_table.items() if k not in own}
        self.general: General = build_options(
            General, {k: v for k, v in general_table.items() if k in own}, "tcpstates")
        self.plugins = plugins_section(tree)
        self.strict = self.general.strict
        self._sources_table = _table(tree, "sources", "sources")
        self.sources = {name: self._source_spec(name, table)
                        for name, table in self._sources_table.items()}
        # the default source and sinks are resolved only if no flag replaces
        # them: `--sink jsonl` works even where the default sink is disabled
        self._source: StageSpec | None = None
        self.chain = self._chain_specs(tree.get("chain", []))
        self._front: list[StageSpec] = []
        self._sinks_table = _table(tree, "sinks", "sinks")
        self.named_sinks = {name: self._sink_spec(name) for name in self._sinks_table}
        self._active_list: list[StageSpec] | None = None
        # what the file says is checked as written, even where a flag overrides
        # it; only the built-in defaults wait until no flag replaced them
        if "source" in general_table:
            self._source = self.source
        self._written_sinks = (self._resolve_sinks(self.general.sinks, "tcpstates.sinks")
                               if "sinks" in general_table else None)

    @classmethod
    def load(cls, tree: dict[str, Any], registry: Registry) -> RunConfig:
        return cls(tree, registry)

    # -- building specs ------------------------------------------------------------
    def _source_spec(self, name: str, table: Any, where: str | None = None) -> StageSpec:
        path = f"sources.{name}"
        info = self.registry.get("source", name)
        if info is None:
            raise ConfigError(where or path, f"unknown source {name!r} (available: "
                              f"{', '.join(self.registry.names('source'))})")
        if table is None:
            table = {}
        if not isinstance(table, dict):
            raise ConfigError(path, "expected a table")
        return StageSpec(path, name, info, build_options(info.cls.Options, dict(table), path), "fail",
                         dict(table))

    def _chain_spec(self, path: str, entry: Any) -> StageSpec:
        if not isinstance(entry, dict):
            raise ConfigError(path, "expected a table with use = \"NAME\"")
        table = dict(entry)
        name = table.pop("use", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.use", "missing: name the filter or enricher to use")
        both = self.registry.get("filter", name), self.registry.get("enricher", name)
        if all(both):
            raise ConfigError(f"{path}.use", f"{name!r} is both a filter ({both[0].distribution}) and "
                              f"an enricher ({both[1].distribution}); disable one in [plugins]")
        info = both[0] or both[1]
        if info is None:
            avail = self.registry.names("filter") + self.registry.names("enricher")
            raise ConfigError(f"{path}.use", f"unknown filter or enricher {name!r} "
                              f"(available: {', '.join(sorted(avail))}; see 'tcpstates plugins')")
        on_error = _policy(table, path, info.cls, FILTER_POLICIES)
        return StageSpec(path, name, info, build_options(info.cls.Options, table, path), on_error, table)

    def _chain_specs(self, chain: Any) -> list[StageSpec]:
        if not isinstance(chain, list):
            raise ConfigError("chain", "expected an array of tables ([[chain]])")
        return [self._chain_spec(f"chain[{i}]", entry) for i, entry in enumerate(chain)]

    def _sink_spec(self, name: str, where: str = "--sink") -> StageSpec:
        path = f"sinks.{name}"
        table = self._sinks_table.get(name)
        if table is None:
            table = {}
        elif not isinstance(table, dict):
            raise ConfigError(path, "expected a table")
        table = dict(table)
        type_name = table.pop("type", name)
        if not isinstance(type_name, str):
            raise ConfigError(f"{path}.type", "expected a string")
        info = self.registry.get("sink", type_name)
        if info is None:
            raise ConfigError(f"{path}.type" if name in self._sinks_table else where,
                              f"unknown sink {type_name!r} (available: "
                              f"{', '.join(self.registry.names('sink'))}; named sinks from the config: "
                              f"{', '.join(sorted(self._sinks_table)) or 'none'})")
        on_error = _policy(table, path, info.cls, SINK_POLICIES)
        return StageSpec(path, name, info, build_options(info.cls.Options, table, path), on_error, table)

    # -- what plugins may read -------------------------------------------------------
    def setting(self, key: str, default: Any, *, choices: Sequence[Any]) -> Any:
        """Claim a plugin's own [tcpstates] key (e.g. the owner plugin's `owner`)."""
        value = self._unclaimed.pop(key, default)
        if value not in choices:
            raise ConfigError(f"tcpstates.{key}", f"expected one of {', '.join(map(str, choices))}, "
                              f"got {value!r}")
        return value

    @property
    def source(self) -> StageSpec:
        """The active source ([tcpstates] source, unless a flag chose another)."""
        if self._source is None:
            self._source = self.sources.get(self.general.source) or self._source_spec(
                self.general.source, None, where="tcpstates.source")
        return self._source

    @property
    def _active(self) -> list[StageSpec]:
        if self._active_list is None:
            self._active_list = (self._written_sinks if self._written_sinks is not None
                                 else self._resolve_sinks(self.general.sinks, "tcpstates.sinks"))
        return self._active_list

    @_active.setter
    def _active(self, specs: list[StageSpec]) -> None:
        self._active_list = specs

    def sink_specs(self) -> list[StageSpec]:
        """The active sinks, in order."""
        return list(self._active)

    def has_sink(self, name: str) -> bool:
        return any(s.name == name for s in self._active)

    def uses(self, name: str) -> bool:
        """Is this filter or enricher in the chain already?"""
        return any(s.name == name for s in self._front + self.chain)

    def source_is_live(self) -> bool:
        """Tracing this machine now (not replaying or feeding preset events)."""
        cls = self.source.cls
        return issubclass(cls, Source) and cls.needs_kernel

    # -- what plugins may change -------------------------------------------------------
    def set_sinks(self, names: Sequence[str], *, where: str) -> None:
        """Replace the active sinks (--sink NAME... does this)."""
        self._active = self._resolve_sinks(names, where)

    def _resolve_sinks(self, names: Sequence[str], where: str) -> list[StageSpec]:
        seen: list[str] = []
        for name in names:
            if not name:
                raise UsageError(f"{where}: empty sink name; e.g. text")
            if name in seen:
                raise UsageError(f"{where}: sink {name!r} given twice; name each sink once")
            seen.append(name)
        return [self.named_sinks.get(n) or self._sink_spec(n, where) for n in seen]

    def add_sink(self, name: str, *, label: str = "a command-line flag") -> None:
        """Add a sink (a type or a [sinks] name) unless it is active already."""
        if not self.has_sink(name):
            self._active.append(self.named_sinks.get(name) or self._sink_spec(name, label))

    def replace_sink(self, old: str, new: str, *, label: str = "a command-line flag") -> None:
        spec = self.named_sinks.get(new) or self._sink_spec(new, label)
        self._active = [spec if s.name == old else s for s in self._active]

    def set_sink_options(self, name: str, **changes: Any) -> None:
        """Change options of one active sink; the result is validated like the file."""
        for i, spec in enumerate(self._active):
            if spec.name == name:
                table = {**spec.table, **changes}
                self._active[i] = dataclasses.replace(
                    spec, options=build_options(spec.cls.Options, table, spec.label), table=table)
                return
        raise KeyError(name)

    def prepend_chain(self, name: str, label: str, **options: Any) -> None:
        """Put a filter or enricher in front of the configured chain (flags do this).

        Front stages keep the order in which plugins add them.
        """
        spec = self._chain_spec(label, {"use": name, **options})
        self._front.append(spec)

    def use_source(self, name: str, label: str, **options: Any) -> None:
        """Take events from another source (--replay does this)."""
        table = self._sources_table.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"sources.{name}", "expected a table")
        self._source = self._source_spec(name, {**table, **options}, where=label)

    def make_strict(self) -> None:
        self.strict = True

    # -- the result ----------------------------------------------------------------------
    def finish(self) -> RunPlan:
        """The final plan: front + chain with what stages require, the active sinks."""
        if self._unclaimed:
            key = sorted(self._unclaimed)[0]
            raise ConfigError(f"tcpstates.{key}", "no enabled plugin uses this setting (the core's: "
                              f"{', '.join(f.name for f in dataclasses.fields(General))}); remove "
                              f"it, or enable the plugin it belongs to in [plugins]")
        if not self._active:
            raise UsageError("no sinks: give --sink NAME or set tcpstates.sinks in the config")
        chain: list[StageSpec] = []
        for spec in self._front + self.chain:
            # a stage that needs another's fields (container needs owner) gets it
            # inserted just before it, with default options, if the chain lacks it
            for need in spec.cls.requires:
                if not any(s.name == need for s in chain):
                    dep = self.registry.find(need, ("enricher", "filter"))
                    label = f"{spec.label}(needs {need})"
                    if dep is None:
                        raise ConfigError(f"{spec.label}.use", f"{spec.name!r} needs {need!r}, which is "
                                          f"disabled or not installed")
                    chain.append(StageSpec(label, need, dep, build_options(dep.cls.Options, {}, label),
                                           dep.cls.default_on_error))
            chain.append(spec)
        return RunPlan(self.source, chain, list(self._active), self.strict)
