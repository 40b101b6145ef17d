"""CLI wiring: fast start, help everywhere, README and CI agree."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner
from conftest import REPO, run_cli

from lora_tools.cli import cli


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from lora_tools.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "for command in ('merge', 'inspect', 'unmerge'):\n"
        "    try:\n        cli([command, '--help'])\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")


def test_every_command_has_help():
    runner = CliRunner()
    for name, command in cli.commands.items():
        assert command.help and len(command.help) > 20, name
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name


def test_readme_test_command_is_what_ci_runs():
    ci_command = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")
    ]
    assert len(ci_command) == 1
    assert ci_command[0] in (REPO / "README.md").read_text()


def test_readme_merge_command_runs_on_the_fixtures(tmp_path):
    readme = (REPO / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "loratool merge fixtures/" in line)
    args = line.split("loratool merge ", 1)[1].split()
    out_index = args.index("--output") + 1
    args[out_index] = str(tmp_path / "merged")
    args = [str(REPO / a) if a.startswith("fixtures/") else a for a in args]
    result = run_cli(["merge", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tensors_changed"] == 14 and (tmp_path / "merged" / "model.safetensors").is_file()


def test_merge_json_and_dry_run(adapters, tmp_path):
    base, adapter = adapters["plain"]
    dry = run_cli(["merge", base, adapter, "-o", tmp_path / "out", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True and plan["tensors_changed"] == 14
    assert {t["scale"] for c in plan["changes"] for t in c["terms"]} == {2.0}
    assert not (tmp_path / "out").exists()
    done = run_cli(["merge", base, adapter, "-o", tmp_path / "out", "--json", "-q"])
    report = json.loads(done.stdout)
    assert report["tensors_changed"] == 14 and report["tensors_copied"] == 7
    assert report["max_abs_delta"] > 0 and report["files"] == ["model.safetensors"]


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "lora_tools", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "loratool" in result.stdout
