"""The console every layer reports on (stderr): progress, warnings and notices interleave in order,
and stdout stays free for what a command prints as its result (tables, ``--print-config``)."""

from rich.console import Console

console = Console(stderr=True)
