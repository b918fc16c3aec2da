"""tcpstates.toml: finding, reading and overriding the config file.

Validation and the typed run configuration built from it live in
`tcpstates.runconfig`.

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

import os
import tomllib
from pathlib import Path
from typing import Any

from tcpstates.errors import UsageError

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


MAX_CONFIG_BYTES = 1 << 20   # a config is a few KiB; /dev/zero must not fill memory


def _open_config(path: Path, allow_insecure: bool) -> int:
    """Open the config so that the checks and the read use the same descriptor.

    As root (unless --allow-insecure-config), every directory and symbolic
    link on the way must be unchangeable by others (as sshd and sudo demand),
    and the file itself must be root's and not writable by others: checked
    with fstat on an O_PATH descriptor first, so a FIFO or device is refused
    without ever being opened (it could hang the start, or act on open), then
    the same inode is opened for reading through that descriptor.
    """
    from tcpstates.safeopen import NotOwned, NotRegularFile, open_regular_checked

    try:
        return open_regular_checked(str(path), enforce=os.geteuid() == 0 and not allow_insecure)
    except NotRegularFile as exc:
        if exc.is_dir:
            raise UsageError(f"{path}: is a directory, not a config file; pass a .toml file to --config") from None
        raise UsageError(f"{path}: not a regular file (a FIFO, socket or device); pass a .toml file") from None
    except NotOwned as exc:
        raise UsageError(f"{path}: refusing to read as root because {exc.strerror}; fix it with "
                         f"'chown root {path} && chmod go-w {path}', or pass --allow-insecure-config") from None


def _read_capped(fd: int, path: Path) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a tcpstates config")
        chunks.append(chunk)


def read_config_file(path: Path, *, allow_insecure: bool = False) -> dict[str, Any]:
    from tcpstates.safeopen import UntrustedPath

    try:
        fd = _open_config(path, allow_insecure)
        try:
            data = _read_capped(fd, path)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found; check the --config path") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the config file (permission denied)") from None
    except UntrustedPath as exc:
        raise UsageError(f"{path}: refusing to read as root because {exc.strerror}; fix the "
                         f"ownership/mode, or pass --allow-insecure-config") from None
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
    except RecursionError:
        raise UsageError(f"{path}: malformed TOML: nested too deeply") from None


def find_config(explicit: str | None, *, allow_insecure: bool = False) -> tuple[dict[str, Any], Path | None]:
    if explicit is not None:
        if explicit == "":
            raise UsageError("--config: empty path; give the path of a .toml file")
        if "\0" in explicit:
            raise UsageError("--config: the path contains a NUL byte")
        path = Path(explicit)
        return read_config_file(path, allow_insecure=allow_insecure), path
    for path in default_search_path():
        try:
            present = path.exists() or path.is_symlink()
        except ValueError:   # a NUL byte in $TCPSTATES_CONFIG or $HOME
            raise UsageError(f"{str(path)!r}: the config path contains a NUL byte") from None
        except OSError as exc:
            # e.g. HOME unreadable for this user: name it, rather than guess past it
            raise UsageError(f"{path}: cannot look for a config file here ({exc.strerror}); pass "
                             f"--config PATH or set {CONFIG_ENV}") from None
        if present:
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
    except RecursionError:
        raise UsageError(f"-o {key}: the value is nested too deeply") from None
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_override(config: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = config
    # [[chain]] entries are addressed by index: -o chain.0.min_ms=100
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            # ASCII digits only: "٠" is a digit to str.isdigit and 0 to int()
            # ASCII digits only, and few: int() refuses more than 4,300 digits
            # (a ValueError, not a usage error) and no list is that long anyway
            if not (part.isascii() and part.isdigit() and len(part) <= 9) or int(part) >= len(node):
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
