"""`python -m cli ...`: the `ituning` command line, as the installed script runs it."""

from cli.main import main

main()
