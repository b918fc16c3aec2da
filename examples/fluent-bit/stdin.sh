#!/bin/sh
# Pipe path: JSON Lines straight into Fluent Bit's stdin input (stdin.conf says why
# it is a plain stdin input plus a parser filter). EOF (tcpstates stopped with
# SIGINT/SIGTERM) makes Fluent Bit flush and exit; if Fluent Bit goes away first,
# tcpstates exits 1 with a message and its summary.
cd "$(dirname "$0")" && exec sh -c 'tcpstates --sink jsonl | fluent-bit -c stdin.conf'
