"""The CLI as a newcomer and a CI log see it: quiet first run, whole log lines, grouped help, env, completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, run_cli

from lora_tools.cli import cli
from lora_tools.cli.help import EXAMPLES, OPTION_GROUPS

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _loratool(args, *, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run loratool as a user would, with stdout and stderr piped (never a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)], capture_output=True, text=True, env=env, **kwargs
    )


@pytest.fixture
def numpy_missing(tmp_path) -> dict:
    """An environment in which `import numpy` fails, as in a fresh venv with only our dependencies."""
    fake = tmp_path / "no-numpy" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    paths = [str(fake.parent), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def test_first_merge_in_a_pipe_prints_only_our_own_whole_lines(tmp_path, numpy_missing):
    # nested folders make the summary line longer than 1,000 characters
    output = tmp_path.joinpath(*(f"{i}-" + "x" * 240 for i in range(5))) / "merged"
    result = _loratool(
        ["merge", REPO / "fixtures/tiny-llama", REPO / "fixtures/tiny-llama-lora", "-o", output],
        env_extra=numpy_missing,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warning" not in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("merged 1 adapter(s) into")]
    assert len(summary) == 1 and len(summary[0]) > 1000
    assert str(output) in summary[0] and "max |ΔW|" in summary[0]
    others = [line for line in result.stderr.splitlines() if line not in summary]
    assert all(line.startswith("merge: ") for line in others), others  # plain progress lines only
    assert (output / "model.safetensors").is_file()


def test_tensor_bytes_needs_no_numpy(numpy_missing):
    code = (
        "import struct\n"
        "import lora_tools, torch\n"
        "from lora_tools.io.tensors import tensor_bytes\n"
        "view = tensor_bytes(torch.arange(4, dtype=torch.float32))\n"
        "assert bytes(view) == struct.pack('<4f', 0, 1, 2, 3)\n"
        "print(len(view))\n"
    )
    env = {**os.environ, **numpy_missing}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "16", result.stderr
    assert "NumPy" not in result.stderr


def test_plain_progress_prints_a_line_per_tenth(capsys):
    from lora_tools.cli.console import plain_progress

    update = plain_progress("merge", lambda done, total: f"{done}/{total}")
    for done in range(0, 1001, 7):
        update(done, 1000)
    update(1000, 1000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "merge: 0/1000" and lines[-1] == "merge: 1000/1000"
    assert len(lines) == 11  # 0 %, 10 %, …, 100 %


def test_colour_only_when_asked(adapters):
    base, adapter = adapters["plain"]
    plain = _loratool(["inspect", adapter, "--base", base])
    forced = _loratool(["--color", "always", "inspect", adapter, "--base", base])
    by_env = _loratool(["inspect", adapter, "--base", base], env_extra={"FORCE_COLOR": "1"})
    refused = _loratool(["--color", "never", "inspect", adapter, "--base", base], env_extra={"FORCE_COLOR": "1"})
    assert plain.returncode == forced.returncode == by_env.returncode == refused.returncode == 0
    assert not ANSI.search(plain.stderr) and not ANSI.search(refused.stderr)
    assert ANSI.search(forced.stderr) and ANSI.search(by_env.stderr)
    assert ANSI.sub("", forced.stderr) == plain.stderr


def _all_commands():
    return sorted(cli.commands.items())


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_groups_options_in_order_and_ends_with_examples(name):
    result = CliRunner().invoke(cli, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0
    text = result.output
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    order = [heading for heading, _ in OPTION_GROUPS]
    shown = [h for h in headings if h in order]
    assert shown == sorted(shown, key=order.index), headings
    assert "Other options" not in headings, f"{name}: every option needs a heading in cli.help.OPTION_GROUPS"
    assert headings[-2:] == ["Help", "Examples"]
    examples = [line.strip() for line in text.split("Examples:", 1)[1].splitlines() if line.strip()]
    assert examples and all(line.startswith(f"$ loratool {name}") for line in examples)


def test_every_option_has_a_heading_and_every_command_examples():
    grouped = {name for _, names in OPTION_GROUPS for name in names}
    for name, command in _all_commands():
        assert EXAMPLES.get(name), f"{name} has no examples in cli.help.EXAMPLES"
        for param in command.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert param.name in grouped, f"{name} --{param.name} has no heading"


def test_required_options_come_first_in_their_group():
    text = CliRunner().invoke(cli, ["merge", "--help"], terminal_width=100).output
    output_section = text.split("Output:", 1)[1].split("\n\n", 1)[0]
    assert output_section.strip().startswith("-o, --output")


def test_examples_name_real_options():
    """Every option an example uses exists on that command (examples stay true as options change)."""
    for name, lines in EXAMPLES.items():
        command = cli.commands[name]
        known = {opt for param in command.params for opt in param.opts}
        for line in lines:
            for word in line.split():
                if re.fullmatch(r"--?[A-Za-z][\w-]*", word):  # not a negative number such as -0.5
                    assert word in known, f"example {line!r} uses unknown option {word}"


def test_env_json_has_every_field_and_never_the_token(monkeypatch):
    secret = "hf_" + "Sx7" * 11
    result = _loratool(["env", "--json"], env_extra={"HF_TOKEN": secret})
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout and secret not in result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == 1
    for key in (
        "lora_tools", "python", "platform", "libraries", "cpu_count", "usable_cpus", "cuda_available",
        "cuda_devices", "mps_available", "hf_home", "hf_hub_cache", "token_configured",
    ):  # fmt: skip
        assert key in report, key
    for library in ("torch", "safetensors", "huggingface-hub", "transformers", "peft", "diffusers", "gguf"):
        assert library in report["libraries"], library
    assert report["libraries"]["torch"] and report["token_configured"] is True
    assert report["hf_home"] == os.environ["HF_HOME"] and Path(report["hf_hub_cache"]).is_relative_to(report["hf_home"])
    without = json.loads(_loratool(["env", "--json"]).stdout)
    assert without["token_configured"] is False


def test_env_text_lists_versions():
    result = _loratool(["env"])
    assert result.returncode == 0
    assert re.search(r"^torch\s+\d", result.stdout, re.M) and re.search(
        r"^hf token\s+not configured", result.stdout, re.M
    )


def test_shell_completion_offers_merge():
    env = {"_LORATOOL_COMPLETE": "bash_complete", "COMP_WORDS": "loratool me", "COMP_CWORD": "1"}
    result = _loratool([], env_extra=env)
    assert result.returncode == 0
    assert "merge" in result.stdout.split() or "plain,merge" in result.stdout.splitlines()
    script = _loratool([], env_extra={"_LORATOOL_COMPLETE": "bash_source"})
    assert "_LORATOOL_COMPLETE=bash_complete" in script.stdout


def test_json_reports_carry_the_schema(adapters, tmp_path):
    base, adapter = adapters["plain"]
    for args in (
        ["inspect", adapter],
        ["inspect", base],
        ["merge", base, adapter, "-o", tmp_path / "m", "--json", "-q"],
    ):
        result = run_cli([*args, "--json"] if "--json" not in args else args)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["schema"] == 1


def _json_docs_row(label: str) -> str:
    """The row of the JSON reports page's table (docs/pages/json.md) for `label`."""
    page = (REPO / "docs" / "pages" / "json.md").read_text()
    return next(line for line in page.splitlines() if line.startswith(f"| {label} |"))


def _assert_documented(report: dict, label: str) -> None:
    row = _json_docs_row(label)
    missing = [key for key in report if key != "schema" and f"`{key}`" not in row]
    assert not missing, f"docs/pages/json.md's table row {label} lacks {missing}"
    for key in ("modules", "changes"):
        if report.get(key):
            nested = [k for k in report[key][0] if f"`{k}`" not in row]
            assert not nested, f"docs/pages/json.md's table row {label} lacks {key} fields {nested}"


def test_json_docs_page_documents_every_json_field(adapters, tmp_path):
    base, adapter = adapters["plain"]
    merged = tmp_path / "merged"
    cases = [
        (["inspect", adapter, "--base", base, "--json"], "`inspect` (adapter)"),
        (["inspect", base, "--json"], "`inspect` (checkpoint)"),
        (["merge", base, adapter, "-o", merged, "--json", "-q"], "`merge`, `unmerge`"),
        (["extract", base, merged, "-o", tmp_path / "extracted", "-r", "2", "--json", "-q"], "`extract`, `resize`, `convert`"),
        (["env", "--json"], "`env`"),
        (["diff", base, merged, "--json", "-q"], "`diff`"),
    ]  # fmt: skip
    for args, label in cases:
        result = run_cli(args)
        assert result.exit_code == 0, (args, result.stderr)
        _assert_documented(json.loads(result.stdout), label)
    combined = run_cli(["combine", adapter, adapter, "-o", tmp_path / "combined", "--json", "-q"])
    _assert_documented(json.loads(combined.stdout), "`combine`")
    checked = json.loads(run_cli(["check", adapter, "--for", "vllm", "--max-lora-rank", "2", "--json"]).stdout)
    _assert_documented(checked, "`check` (and `inspect --for`, under `check`)")
    row = _json_docs_row("`check` (and `inspect --for`, under `check`)")
    assert checked["findings"] and not [k for k in checked["findings"][0] if f"`{k}`" not in row]
    stats = run_cli(["inspect", adapter, "--stats", "--json"])
    _assert_documented(json.loads(stats.stdout)["stats"], "`inspect --stats`")
    diffed = json.loads(run_cli(["diff", base, merged, "--json", "-q"]).stdout)
    changed = next(t for t in diffed["tensors"] if t["status"] == "changed")
    assert not [k for k in changed if f"`{k}`" not in _json_docs_row("`diff`")]
