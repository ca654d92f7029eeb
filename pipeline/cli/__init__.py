"""The ``n2n`` command line: parses flags from the one flag table and runs a command."""
