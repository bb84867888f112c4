"""Command-line entry points: they only parse arguments and call the library modules (the table: commands.py)."""
