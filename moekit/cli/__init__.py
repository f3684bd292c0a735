"""The ``moekit`` command line: one small module per command, wired in main.py."""
