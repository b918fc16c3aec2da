"""The `container` enricher (container, pod, systemd unit from the owner's cgroup)
and the `workload` filter that keeps events by them."""

from __future__ import annotations

from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.container.enricher import ContainerEnricher, WorkloadFilter


@hookimpl
def tcpstates_register_enrichers(register: Any) -> None:
    register(ContainerEnricher)


@hookimpl
def tcpstates_register_filters(register: Any) -> None:
    register(WorkloadFilter)
