"""Command-line entry points, one module per command (see setup.py console_scripts)."""
