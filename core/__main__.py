"""`python -m tcpstates` runs the command line."""

from tcpstates.cli import main

raise SystemExit(main())
