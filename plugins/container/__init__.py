"""The `container` enricher (container, pod, names, systemd unit from the owner's
cgroup and the runtimes' files) and the `workload` filter that keeps events by them.

With --owner on a live trace the enricher joins the chain too, so the text
and CSV tables can show the owner's pod or container name (WORKLOAD column).
"""

from __future__ import annotations

import argparse
from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.container.enricher import ContainerEnricher
from tcpstates.plugins.container.workload import WorkloadFilter
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_enrichers(register: Any) -> None:
    register(ContainerEnricher)


@hookimpl
def tcpstates_register_filters(register: Any) -> None:
    register(WorkloadFilter)


@hookimpl
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if not getattr(args, "owner", False) or not config.source_is_live() or config.uses("container"):
        return
    # the owner must come first; the owner plugin sees it is there and adds nothing
    if not config.uses("owner"):
        config.prepend_chain("owner", "--owner")
    config.prepend_chain("container", "--owner")


@hookimpl
def tcpstates_doctor_checks(register: Any) -> None:
    from tcpstates.speedups import doctor_check as speedup_check
    from tcpstates.plugins.container.enricher import C_ENRICH_AVAILABLE
    register(speedup_check("container loop", C_ENRICH_AVAILABLE, "C loop of the container enricher is in use",
                           "same fields"))
