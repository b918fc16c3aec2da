"""Plugin discovery: the pluggy manager factory and the name → stage-class table.

Built-in stages are registered through the very hooks a third-party package
uses (`tcpstates.plugins.DEFAULT_PLUGINS`). Third-party packages are found
through the `tcpstates` entry-point group of installed distributions only;
one that fails to import is reported and skipped. The core owns the name
table and refuses two stages of the same kind and name.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterable, cast

import pluggy

import tcpstates
from tcpstates import hookspecs
from tcpstates.api import Enricher, Filter, Sink, Source, Stage, Warner
from tcpstates.errors import EnvironmentProblem, StageError, UsageError
from tcpstates.options import describe_options
from tcpstates.security import check_plugin_file, check_plugin_tree

KINDS = {"source": Source, "filter": Filter, "enricher": Enricher, "sink": Sink}
ENTRY_POINT_GROUP = "tcpstates"
# where a plugin passed to make_plugin_manager(extra_plugins=...) comes from
IN_PROCESS = ("registered in-process", "")


@dataclasses.dataclass
class StageInfo:
    name: str
    kind: str
    cls: type[Stage]
    plugin: str          # pluggy plugin name that registered it
    distribution: str
    version: str

    @property
    def description(self) -> str:
        return getattr(self.cls, "description", "") or (self.cls.__doc__ or "").strip().split("\n")[0]


class Registry:
    """All known stages by kind and name, with where each came from."""

    def __init__(self, pm: pluggy.PluginManager, dists: dict[str, tuple[str, str]]) -> None:
        self.pm = pm
        self._dists = dists
        self.stages: dict[tuple[str, str], StageInfo] = {}
        self.disabled: set[str] = set()

    def plugin_of(self, hook_name: str) -> Callable[[], str]:
        """Which plugin's implementation of `hook_name` is running now.

        pluggy calls the implementations itself; the registration callback
        finds its caller by matching the frames on the stack against the
        implementations' code objects (a plugin may call `register` from a
        helper of its own).
        """
        # by identity: equal code objects (the same plugin source in two
        # distributions) compare equal
        codes = {id(impl.function.__code__): impl.plugin_name
                 for impl in getattr(self.pm.hook, hook_name).get_hookimpls()}

        def current() -> str:
            frame = sys._getframe(1)
            while frame is not None:
                name = codes.get(id(frame.f_code))
                if name is not None:
                    return name
                frame = frame.f_back   # type: ignore[assignment]
            return "unknown plugin"
        return current

    def where(self, plugin: str) -> tuple[str, str]:
        return _where(self._dists, plugin)

    def label(self, plugin: str) -> str:
        """Where `plugin` comes from, for messages: "tcpstates-foo 1.0",
        "tcpstates 0.1.0" (a built-in), "registered in-process"."""
        return _label(self._dists, plugin)

    def _register_from(self, kind: str, hook_name: str) -> None:
        base = KINDS[kind]
        current = self.plugin_of(hook_name)

        def register(cls: type) -> None:
            plugin = current()
            dist, version = self.where(plugin)
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise UsageError(f"plugin {plugin!r} ({dist}) registered {cls!r} as a "
                                 f"{kind}, but it is not a subclass of tcpstates.{base.__name__}")
            name = getattr(cls, "name", "")
            if not name:
                raise UsageError(f"plugin {plugin!r} ({dist}) registered a {kind} "
                                 f"{cls.__name__} without a name")
            if not isinstance(name, str) or not name.isprintable() or any(c.isspace() for c in name):
                # it is a config key, a --sink value and a column of `tcpstates plugins`
                raise UsageError(f"plugin {plugin!r} ({dist}) registered a {kind} {cls.__name__} whose "
                                 f"name {name!r} is not a plain word; give it a name such as \"my_{kind}\"")
            try:
                # what `tcpstates plugins` and the config checks read: found out here, with
                # the plugin named, not as an internal error of whoever reads it first
                describe_options(cast("type[Stage]", cls).Options)
            except Exception as exc:
                raise UsageError(f"plugin {plugin!r} ({dist}) registered a {kind} {name!r} whose Options "
                                 f"cannot be read ({type(exc).__name__}: {exc}); declare them as a "
                                 f"dataclass with option(...) fields (docs/plugins.md)") from None
            prior = self.stages.get((kind, name))
            if prior is not None:
                raise UsageError(
                    f"{kind} {name!r} is provided by both {self.label(prior.plugin)} "
                    f"and {self.label(plugin)}; uninstall one, or disable "
                    f"one with [plugins] disable = [\"<distribution>\"]")
            self.stages[(kind, name)] = StageInfo(name, kind, cls, plugin, dist, version)   # type: ignore[arg-type]

        self.call(hook_name, register=register)

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook through pluggy; a plugin that raises is named in a one-line error."""
        hook = getattr(self.pm.hook, hook_name)
        current = self.plugin_of(hook_name)
        try:
            return hook(**kwargs)
        except (UsageError, EnvironmentProblem, StageError, SystemExit, BrokenPipeError):
            raise   # already one clear line (or a reader that left): not the plugin's bug
        except Exception as exc:
            plugin = _raising_plugin(exc, hook) or current()
            raise UsageError(f"plugin {plugin!r} ({self.label(plugin)}) failed in {hook_name}: "
                             f"{type(exc).__name__}: {exc}; fix or disable it in [plugins]") from exc

    def collect(self) -> None:
        self._register_from("source", "tcpstates_register_sources")
        self._register_from("filter", "tcpstates_register_filters")
        self._register_from("enricher", "tcpstates_register_enrichers")
        self._register_from("sink", "tcpstates_register_sinks")

    def disable(self, names: Iterable[str]) -> None:
        """Disable stages by name (any kind)."""
        self.disabled.update(names)

    def get(self, kind: str, name: str) -> StageInfo | None:
        if name in self.disabled:
            return None
        return self.stages.get((kind, name))

    def find(self, name: str, kinds: Iterable[str]) -> StageInfo | None:
        for kind in kinds:
            info = self.get(kind, name)
            if info is not None:
                return info
        return None

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self.stages if k == kind and n not in self.disabled)

    def all(self) -> list[StageInfo]:
        order = list(KINDS)
        return sorted((i for i in self.stages.values() if i.name not in self.disabled),
                      key=lambda i: (order.index(i.kind), i.name))


def _where(dists: dict[str, tuple[str, str]], plugin: str) -> tuple[str, str]:
    return dists.get(plugin, ("tcpstates", tcpstates.__version__))


def _label(dists: dict[str, tuple[str, str]], plugin: str) -> str:
    return " ".join(part for part in _where(dists, plugin) if part)


def _in_process_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    """A readable, unique pluggy name for a plugin object passed in-process
    (pluggy's default is its id() number): its module's or class's dotted name."""
    if isinstance(plugin, types.ModuleType):
        base = plugin.__name__
    else:
        cls = plugin if isinstance(plugin, type) else type(plugin)
        base = f"{cls.__module__}.{cls.__qualname__}"
    name, n = base, 1
    while pm.get_plugin(name) is not None or pm.is_blocked(name):
        n += 1
        name = f"{base}#{n}"
    return name


def _raising_plugin(exc: BaseException, hook: Any) -> str | None:
    """The plugin whose hook implementation appears deepest in the traceback."""
    codes = {id(impl.function.__code__): impl.plugin_name for impl in hook.get_hookimpls()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        found = codes.get(id(tb.tb_frame.f_code), found)
        tb = tb.tb_next
    return found


def _entry_point_files(ep: Any) -> list[Path]:
    """Every file importing the entry point runs, found without importing any of it:
    each package's __init__.py and the module itself (pkg/, pkg/sub/, pkg/sub/mod.py),
    and the distribution's entry_points.txt that named it."""
    from importlib.machinery import PathFinder

    files: list[Path] = []
    dist = getattr(ep, "dist", None)
    locate = getattr(dist, "locate_file", None)
    dist_path = getattr(dist, "_path", None)
    if dist_path is not None:
        files.append(Path(dist_path) / "entry_points.txt")
    elif locate is not None:
        files.append(Path(str(locate("entry_points.txt"))))
    parts = ep.module.split(".")
    search: Any = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        try:
            # PathFinder with an explicit path never imports the parent packages
            spec = PathFinder.find_spec(name, search)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            if i == 0:
                try:
                    spec = importlib.util.find_spec(name)   # e.g. a built-in top-level module
                except (ImportError, ValueError):
                    spec = None
            if spec is None:
                break
        if spec.origin and spec.origin not in ("built-in", "frozen", "namespace"):
            files.append(Path(spec.origin))
        for location in spec.submodule_search_locations or ():
            files.append(Path(location))
        search = list(spec.submodule_search_locations or [])
        if not search:
            break
    return files


def _entry_point_trees(ep: Any) -> list[tuple[Path, bool]]:
    """What to check under the entry point's top-level name: a package's whole
    directory tree (submodules, __pycache__), or a single module file with its
    __pycache__ directory and bytecode files."""
    from importlib.machinery import PathFinder

    top = ep.module.split(".")[0]
    try:
        spec = PathFinder.find_spec(top, None)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [(Path(p), True) for p in spec.submodule_search_locations]
    if not spec.origin or spec.origin in ("built-in", "frozen"):
        return []
    module = Path(spec.origin)
    cache = module.parent / "__pycache__"
    trees = [(module, False)]
    if cache.exists() or cache.is_symlink():
        # the directory itself (others' bytecode may share it), then this module's entries
        trees.append((cache, False))
        trees.extend((p, False) for p in cache.glob(f"{module.stem}.*"))
    return trees


def _load_entry_points(pm: pluggy.PluginManager, dists: dict[str, tuple[str, str]],
                       blocked: set[str], warner: Warner, strict: bool,
                       allow_insecure: bool = False) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else "unknown distribution"
        version = dist.version if dist is not None else "?"
        if ep.name in blocked or dist_name in blocked:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        for location in _entry_point_files(ep):
            check_plugin_file(location, f"plugin {ep.name!r} ({dist_name} {version})", allow_insecure)
        for tree, recursive in _entry_point_trees(ep):
            check_plugin_tree(tree, f"plugin {ep.name!r} ({dist_name} {version})", allow_insecure, recursive)
        try:
            plugin = ep.load()
        except Exception as exc:   # any import-time error of foreign code
            message = (f"plugin {ep.name!r} from distribution {dist_name} {version} failed to "
                       f"import ({type(exc).__name__}: {exc}); reinstall or uninstall it")
            if strict:
                raise UsageError(message) from None
            warner.warn(f"warning: {message}; continuing without it")
            continue
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as exc:   # e.g. a hook argument misnamed
            message = (f"plugin {ep.name!r} from distribution {dist_name} {version} does not match "
                       f"tcpstates' hooks ({' '.join(str(exc).split())}); update or uninstall it")
            if strict:
                raise UsageError(message) from None
            warner.warn(f"warning: {message}; continuing without it")
            continue
        dists[ep.name] = (dist_name, version)


def make_plugin_manager(*, entry_points: bool = True, blocked: Iterable[str] = (),
                        extra_plugins: Iterable[Any] = (), warner: Warner | None = None,
                        strict: bool = False, allow_insecure: bool = False) -> Registry:
    """Build a fresh plugin manager and collect every stage it provides.

    Never done at import time, so tests and embedders get independent
    registries. `blocked` names plugins or distributions not to load at all.
    """
    from tcpstates.plugins import DEFAULT_PLUGINS

    blocked = set(blocked)
    pm = pluggy.PluginManager("tcpstates")
    pm.add_hookspecs(hookspecs)
    dists: dict[str, tuple[str, str]] = {}
    # pluggy calls the last registered first: register the others before the
    # built-ins (in reverse) so built-in hooks run in DEFAULT_PLUGINS order,
    # and a built-in's flags come first in --help.
    for plugin in extra_plugins:
        name = _in_process_name(pm, plugin)
        pm.register(plugin, name=name)
        dists[name] = IN_PROCESS
    if entry_points:
        _load_entry_points(pm, dists, blocked, warner or Warner(), strict, allow_insecure)
    for modname in reversed(DEFAULT_PLUGINS):
        # "tcpstates.plugins.filters.family_flags" is disabled with "filters"
        if modname.split(".")[2] in blocked:
            continue
        pm.register(importlib.import_module(modname), name=modname)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin = pm.get_name(exc.plugin) or repr(exc.plugin)
        # (pluggy's message holds the plugin's repr: a path, or an object's address)
        hooks = ", ".join(sorted(
            name for name, caller in vars(pm.hook).items()
            if not name.startswith("_") and not caller.has_spec()
            and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls()))) or str(exc)
        raise UsageError(f"plugin {plugin!r} ({_label(dists, plugin)}) implements a hook tcpstates does "
                         f"not have: {hooks}; check the hook name against docs/plugins.md") from None
    registry = Registry(pm, dists)
    registry.collect()
    registry.disable(blocked)
    return registry


def call_lifecycle(registry: Registry, hook_name: str, warner: Warner, strict: bool,
                   **kwargs: Any) -> None:
    """Call a lifecycle hook implementation by implementation, so one that
    raises is reported (or fatal with --strict) and never stops the others.

    (A plain pluggy call stops at the first exception; after the pipeline has
    started, one observer's bug must not cost the others their notification.)"""
    hook: Any = getattr(registry.pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):   # pluggy's own call order
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            message = (f"plugin {impl.plugin_name!r} ({registry.label(impl.plugin_name)}) failed in "
                       f"{hook_name}: {type(exc).__name__}: {exc}")
            if strict:
                raise UsageError(message) from exc
            warner.warn(f"warning: {message}")

