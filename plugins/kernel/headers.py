"""Finding a kernel header tree for bcc's compiler.

bcc compiles the BPF C against /lib/modules/$(uname -r)/build. Our program
reads only the tracepoint's own fields and BPF helpers, so any reasonably
recent header tree works when the matching one is missing (common on cloud
and custom kernels). Distributions split generic headers in two directories
(Debian: linux-headers-V-common and linux-headers-V-ARCH), while bcc's
BCC_KERNEL_SOURCE takes one, so we merge them into a symlink farm once, under
/var/cache/tcpstates, and point bcc there.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TCPSTATES_CACHE_DIR", "/var/cache/tcpstates"))
KCONFIG = "include/linux/kconfig.h"


def matching_tree(release: str | None = None) -> Path | None:
    """The running kernel's own header tree, if installed."""
    release = release or platform.release()
    for sub in ("build", "source"):
        tree = Path("/lib/modules") / release / sub
        if (tree / KCONFIG).is_file():
            return tree
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Path("/sys/kernel/kheaders.tar.xz")   # bcc unpacks it itself
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def generic_trees(src: Path = Path("/usr/src")) -> list[tuple[Path, Path | None]]:
    """(arch dir, common dir or None) pairs of installed generic headers, newest first."""
    out: list[tuple[Path, Path | None]] = []
    for arch_dir in sorted(src.glob("linux-headers-*"), key=_version_key, reverse=True):
        if arch_dir.name.endswith("-common") or not arch_dir.is_dir():
            continue
        generated = (arch_dir / "include" / "generated").is_dir()
        if (arch_dir / KCONFIG).is_file():
            # complete only with the configured headers (autoconf.h): Ubuntu's
            # linux-headers-V (common half, no include/generated) is not, its
            # linux-headers-V-generic (links into it) is; Fedora's tree is too
            if generated:
                out.append((arch_dir, None))
            continue
        base = re.sub(r"-[a-z0-9_]+$", "", arch_dir.name)   # linux-headers-6.1.0-56
        common = src / f"{base}-common"
        if (common / KCONFIG).is_file() and generated:
            out.append((arch_dir, common))
    return out


def merged_tree(arch_dir: Path, common: Path | None, cache: Path = CACHE_DIR) -> Path:
    """One directory bcc can use: the arch tree laid over the common tree."""
    if common is None:
        return arch_dir
    target = cache / "kernel-headers" / arch_dir.name
    if (target / KCONFIG).exists() and (target / "include" / "generated").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # cp -as makes a symlink farm: 64 MB of headers cost a few MB of links.
    for layer in (common, arch_dir):
        subprocess.run(["cp", "-as", "--remove-destination", f"{layer}/.", str(tmp)],
                       check=True, capture_output=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def choose_header_tree() -> tuple[Path | None, str]:
    """(tree for BCC_KERNEL_SOURCE or None to let bcc use its default, how found)."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return Path(env), "BCC_KERNEL_SOURCE"
    own = matching_tree()
    if own is not None:
        return None, f"matching headers ({own})"
    for arch_dir, common in generic_trees():
        try:
            return merged_tree(arch_dir, common), f"generic headers {arch_dir.name} (no headers match {platform.release()})"
        except (OSError, subprocess.CalledProcessError):
            continue
    return None, "none found"
