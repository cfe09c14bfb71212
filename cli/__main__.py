"""`python -m cli ...`: the `ituning` command line, as the installed script runs it."""

from cli.main import main

if __name__ == "__main__":  # not again where a child process imports the main module
    main()
