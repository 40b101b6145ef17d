"""The action's run step (action.yml): one loratool command, its JSON report kept as a file, the step's outputs set.

Reads the inputs as GitHub passes them to the step (INPUT_COMMAND, INPUT_JSON, INPUT_FAIL) and writes
`report` and `exit-code` to $GITHUB_OUTPUT. loratool inherits the environment, so inside Actions it
writes its own annotations (stderr) and job summary ($GITHUB_STEP_SUMMARY). Standard library only:
it runs before anything but loratool is installed. LORATOOL replaces the `loratool` command (tests).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "true").strip().lower() == "true"


def arguments(environ: Mapping[str, str]) -> list[str]:
    """loratool's arguments from INPUT_COMMAND (a leading `loratool` is allowed), with --json when asked."""
    words = shlex.split(environ.get("INPUT_COMMAND", ""))
    if words[:1] == ["loratool"]:
        words = words[1:]
    if not words:
        raise SystemExit("::error title=loratool action::input command is empty (e.g. `inspect my-lora --base base`)")
    if _flag(environ, "INPUT_JSON") and "--json" not in words:
        words.append("--json")
    return words


def main(environ: Mapping[str, str] = os.environ) -> int:
    words = arguments(environ)
    command = [*shlex.split(environ.get("LORATOOL", "loratool")), *words]
    folder = Path(environ.get("RUNNER_TEMP") or tempfile.gettempdir())
    report = folder / f"loratool-report-{environ.get('GITHUB_RUN_ID', 'local')}-{os.getpid()}.json"
    if "--json" in words:
        with open(report, "wb") as stdout:
            code = subprocess.run(command, stdout=stdout).returncode
    else:
        code = subprocess.run(command).returncode
    outputs = {"exit-code": str(code), "report": str(report) if report.is_file() and report.stat().st_size else ""}
    with open(environ["GITHUB_OUTPUT"], "a", encoding="utf-8") as handle:
        handle.writelines(f"{name}={value}\n" for name, value in outputs.items())
    print(f"loratool exited {code}" + (f"; JSON report: {outputs['report']}" if outputs["report"] else ""))
    return code if _flag(environ, "INPUT_FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
