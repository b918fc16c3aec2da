"""The kernel stage's C sources (package data: tcpstates.bpf.c, tcpstates.h)."""
