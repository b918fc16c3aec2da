#!/bin/sh
# Path (a'): pipe JSON Lines straight into Fluent Bit's stdin input. The parser
# keeps each event's own time (without it, stdin stamps the read time).
# EOF (tcpstates stopped with SIGINT/SIGTERM) makes Fluent Bit flush and exit.
exec tcpstates --sink jsonl | fluent-bit -R "$(dirname "$0")/parsers.conf" \
    -i stdin -p parser=tcpstates -t tcpstates -o stdout -m tcpstates
