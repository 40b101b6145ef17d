"""The `loratool` command line: it parses, calls the library (`lora_tools.commands`), renders.

`app` holds the group and the entry point; one module per family of commands (`merging`,
`adapters`, `inspecting`, `hub`); the options they share in `options`, what they do around
their library call in `running`, and every report's rendering under `render`.
"""

from .app import cli, main

__all__ = ["cli", "main"]
