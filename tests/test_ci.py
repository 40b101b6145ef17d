"""loratool in CI: GitHub Actions annotations and job summary, JUnit XML, the composite action, the pre-commit hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.cli.ci.github import workflow_command

# The runner's own escaping (actions/runner src/Runner.Common/ActionCommand.cs), in the order it unescapes.
_RUNNER_DATA = (("\r", "%0D"), ("\n", "%0A"), ("%", "%25"))
_RUNNER_PROPERTY = (("\r", "%0D"), ("\n", "%0A"), (":", "%3A"), (",", "%2C"), ("%", "%25"))


def _runner_unescape(text: str, table) -> str:
    for token, replacement in table:
        text = text.replace(replacement, token)
    return text


def parse_workflow_command(line: str) -> tuple[str, dict[str, str], str] | None:
    """A line as the runner's `ActionCommand.TryParseV2` reads it: (command, properties, message), or None."""
    line = line.lstrip()
    if not line.startswith("::"):
        return None
    end = line.find("::", 2)
    if end < 0:
        return None
    info = line[2:end]
    name, _, properties = info.partition(" ")
    parsed = {}
    for item in filter(None, properties.strip().split(",")):
        key, sep, value = item.partition("=")
        if sep and key and value:
            parsed[key] = _runner_unescape(value, _RUNNER_PROPERTY)
    return name, parsed, _runner_unescape(line[end + 2 :], _RUNNER_DATA)


def commands_in(stream: str) -> list[tuple[str, dict[str, str], str]]:
    return [c for c in map(parse_workflow_command, stream.splitlines()) if c is not None]


def invoke(args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture
def mismatched(adapters, llama_base):
    """A GPT-2 adapter against a Llama base: every module is missing from the base."""
    return adapters["gpt2_fan_in_fan_out"][1], llama_base


def actions_env(tmp_path: Path, workspace: Path) -> dict[str, str]:
    return {
        "GITHUB_ACTIONS": "true",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_WORKSPACE": str(workspace),
    }


def test_workflow_command_escaping_round_trips_through_the_runners_parser():
    message = "50% of a\r\nb: c, d :: e"
    title = "loratool inspect: a, b% :: c\nd"
    line = workflow_command("error", message, title=title, file="dir,x/a:b.json")
    assert "\n" not in line and "\r" not in line
    assert parse_workflow_command(line) == ("error", {"title": title, "file": "dir,x/a:b.json"}, message)
    assert workflow_command("warning", "plain") == "::warning::plain"


def test_mismatched_adapter_in_actions_annotates_and_summarises(mismatched, tmp_path):
    adapter, base = mismatched
    env = actions_env(tmp_path, adapter.parent)
    result = invoke(["inspect", adapter, "--base", base, "--json"], env)
    assert result.exit_code == 3
    report = json.loads(result.stdout)  # stdout stays one JSON object
    assert report["validation"]["compatible"] is False
    errors = [c for c in commands_in(result.stderr) if c[0] == "error"]
    assert len(errors) == 1
    _, properties, message = errors[0]
    assert properties == {"title": "loratool inspect", "file": f"{adapter.name}/adapter_config.json"}
    assert "no such module in the base" in message and "transformer.h.0.attn.c_attn" in message
    summary = (tmp_path / "summary.md").read_text()
    assert "loratool inspect: failed (exit 3)" in summary
    assert "| name | target | type |" in summary  # the modules table
    assert summary.count("| transformer.h.") == len(report["modules"])
    assert "### validation" in summary and "no such module in the base" in summary


def test_no_workflow_commands_outside_actions(mismatched, tmp_path):
    adapter, base = mismatched
    env = {**actions_env(tmp_path, adapter.parent), "GITHUB_ACTIONS": ""}
    result = invoke(["inspect", adapter, "--base", base], env)
    assert result.exit_code == 3 and "error: " in result.stderr
    assert commands_in(result.stderr) == [] and commands_in(result.stdout) == []
    assert not (tmp_path / "summary.md").exists()


def test_passing_run_summary_and_check_findings_as_annotations(adapters, llama_base, tmp_path):
    adapter = adapters["plain"][1]
    env = actions_env(tmp_path, tmp_path)
    passed = invoke(["inspect", adapter, "--base", llama_base], env)
    assert passed.exit_code == 0 and commands_in(passed.stderr) == []
    summary = (tmp_path / "summary.md").read_text()
    assert "✅ loratool inspect: passed" in summary and "| num_parameters |" in summary
    refused = invoke(["check", adapter, "--for", "vllm", "--max-lora-rank", "2"], env)
    assert refused.exit_code == 3
    commands = commands_in(refused.stderr)
    assert [(c[0], c[1]["title"]) for c in commands] == [
        ("error", "loratool check: rank_limit"),
        ("error", "loratool check"),
    ]
    assert "rank 4 > 2" in commands[0][2] and "not ready for vllm" in commands[1][2]
    assert "loratool check: failed (exit 3)" in (tmp_path / "summary.md").read_text()  # appended, not replaced
    assert summary in (tmp_path / "summary.md").read_text()


def test_unwritable_summary_is_a_warning(adapters, llama_base, tmp_path):
    env = {**actions_env(tmp_path, tmp_path), "GITHUB_STEP_SUMMARY": str(tmp_path / "no-such-folder" / "summary.md")}
    result = invoke(["inspect", adapters["plain"][1], "--base", llama_base], env)
    assert result.exit_code == 0 and "warning: cannot append to GITHUB_STEP_SUMMARY" in result.stderr
    assert [c[0] for c in commands_in(result.stderr)] == ["warning"]


def test_usage_error_is_annotated(tmp_path):
    result = invoke(["check", tmp_path], actions_env(tmp_path, tmp_path))
    assert result.exit_code == 2
    assert [(c[0], c[1]["title"]) for c in commands_in(result.stderr)] == [("error", "loratool check")]


def read_junit(path: Path):
    """The testcases of a JUnit file, read by junitparser (the PyPI parser CI tools share): {name: failure or None}."""
    from junitparser import Failure, JUnitXml

    document = JUnitXml.fromfile(str(path))
    cases = {}
    for suite in document:
        for case in suite:
            failures = [r for r in case.result if isinstance(r, Failure)]
            assert len(failures) <= 1
            cases[case.name] = failures[0].message if failures else None
    return cases


def test_junit_inspect_one_testcase_per_module(mismatched, adapters, llama_base, tmp_path):
    adapter, base = mismatched
    result = invoke(["inspect", adapter, "--base", base, "--json", "--junit-xml", tmp_path / "bad.xml"])
    assert result.exit_code == 3
    modules = [m["name"] for m in json.loads(result.stdout)["modules"]]
    cases = read_junit(tmp_path / "bad.xml")
    assert sorted(cases) == sorted(modules)
    assert all("no such module in the base" in cases[name] and name in cases[name] for name in modules)
    good = invoke(["inspect", adapters["plain"][1], "--base", llama_base, "--junit-xml", tmp_path / "good.xml"])
    assert good.exit_code == 0
    cases = read_junit(tmp_path / "good.xml")
    assert len(cases) == 2 * 7 and set(cases.values()) == {None}  # 2 layers × 7 targets, all passing


def test_junit_check_one_testcase_per_rule(adapters, tmp_path):
    from lora_tools.serving.rules import RULES

    result = invoke(["check", adapters["plain"][1], "--for", "vllm", "--max-lora-rank", "2", "--junit-xml", tmp_path / "c.xml"])  # fmt: skip
    assert result.exit_code == 3
    cases = read_junit(tmp_path / "c.xml")
    assert sorted(cases) == sorted(rule.id for rule in RULES if "vllm" in rule.effects)
    assert [name for name, failure in cases.items() if failure] == ["rank_limit"]
    assert "rank 4 > 2" in cases["rank_limit"]


def test_junit_diff_one_testcase_per_tensor(llama_base, tmp_path):
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    changed.mkdir()
    for file in llama_base.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    weights = next(changed.glob("*.safetensors"))
    state = load_file(weights)
    name = sorted(n for n in state if n.endswith("q_proj.weight"))[0]
    state[name] = state[name] + 1
    save_file(state, weights, metadata={"format": "pt"})
    result = invoke(["diff", llama_base, changed, "--expect-identical", "--junit-xml", tmp_path / "d.xml", "-q"])
    assert result.exit_code == 3
    cases = read_junit(tmp_path / "d.xml")
    assert sorted(cases) == sorted(state)
    assert [n for n, failure in cases.items() if failure] == [name] and "changed" in cases[name]


def test_junit_merge_dry_run(adapters, mismatched, llama_base, tmp_path):
    planned = invoke(["merge", llama_base, adapters["plain"][1], "-o", tmp_path / "m", "--dry-run", "--json",
                      "--junit-xml", tmp_path / "plan.xml"])  # fmt: skip
    assert planned.exit_code == 0
    changes = [c["tensor"] for c in json.loads(planned.stdout)["changes"]]
    assert sorted(read_junit(tmp_path / "plan.xml")) == sorted(changes) and len(changes) == 14
    adapter, base = mismatched
    refused = invoke(["merge", base, adapter, "-o", tmp_path / "m", "--dry-run", "--junit-xml", tmp_path / "no.xml"])
    assert refused.exit_code == 3
    cases = read_junit(tmp_path / "no.xml")
    assert list(cases) == ["merge"] and "no such module in the base" in cases["merge"]
    assert not (tmp_path / "m").exists()


def test_junit_unwritable_path_is_an_error(adapters, llama_base, tmp_path):
    target = tmp_path / "missing-folder" / "report.xml"
    result = invoke(["inspect", adapters["plain"][1], "--base", llama_base, "--junit-xml", target])
    assert result.exit_code == 4 and "cannot write the JUnit report" in result.stderr
    assert not target.parent.exists()


def _with_reader_gone(arguments: list[str]):
    """Run loratool with a stdout pipe whose reader closed before the first byte (`loratool … | head -0`)."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "lora_tools", *map(str, arguments)],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(writer)


@pytest.mark.parametrize("arguments", [["env"], ["--version"]])
def test_closed_stdout_is_a_quiet_end_with_141(arguments):
    done = _with_reader_gone(arguments)
    assert done.returncode == 141 and done.stderr == ""


def test_closed_stdout_does_not_hide_errors(tmp_path):
    done = _with_reader_gone(["inspect", tmp_path / "missing"])
    assert done.returncode == 3 and "no such file or folder" in done.stderr


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter_repo(adapters, llama_base, tmp_path) -> Path:
    """A git repository of adapters that name their base by a relative path: one fits it, one does not."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(llama_base, root / "base")
    for name, variant in (("good", "plain"), ("bad", "gpt2_fan_in_fan_out")):
        shutil.copytree(adapters[variant][1], root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "../base"
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    return root


def test_validate_checks_each_touched_adapter_against_its_base(adapter_repo, tmp_path):
    files = [adapter_repo / "good" / "adapter_model.safetensors", adapter_repo / "good" / "adapter_config.json",
             adapter_repo / "bad" / "adapter_config.json", adapter_repo / "base" / "config.json"]  # fmt: skip
    result = invoke(["validate", *files, "--json", "--junit-xml", tmp_path / "v.xml"])
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert [a["path"] for a in report["adapters"]] == [str(adapter_repo / "good"), str(adapter_repo / "bad")]
    assert report["skipped"] == [str(adapter_repo / "base" / "config.json")]
    good, bad = report["adapters"]
    assert good["base"] == bad["base"] == str(adapter_repo / "base") and not good["problems"]
    assert bad["problems"] and all("no such module in the base" in p for p in bad["problems"])
    row = next(
        line for line in (REPO / "docs/pages/json.md").read_text().splitlines() if line.startswith("| `validate`")
    )
    assert not [key for key in [*report, *good] if key != "schema" and f"`{key}`" not in row]
    cases = read_junit(tmp_path / "v.xml")
    assert (
        cases[str(adapter_repo / "good")] is None and "transformer.h.0.attn.c_attn" in cases[str(adapter_repo / "bad")]
    )
    assert len(cases) == 2
    assert invoke(["validate", adapter_repo / "good"]).exit_code == 0
    explicit = invoke(["validate", adapter_repo / "good", "--base", adapter_repo / "bad"])
    assert explicit.exit_code == 3 and "error: 1 of 1 adapter(s) invalid" in explicit.stderr


def test_validate_names_a_git_lfs_pointer(adapter_repo):
    weights = adapter_repo / "good" / "adapter_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 16384\n")
    result = invoke(["validate", weights])
    assert result.exit_code == 3
    assert f"{weights}: a Git LFS pointer, not the weights; run `git lfs pull`" in result.stderr


def test_validate_never_imports_torch(adapter_repo):
    import subprocess
    import sys

    script = (
        "import sys\nfrom lora_tools.cli import cli\n"
        "try:\n    cli.main(sys.argv[1:], prog_name='loratool')\nexcept SystemExit as done:\n    code = done.code\n"
        "print(code, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])\n"
    )
    for adapter in ("good", "bad"):
        done = subprocess.run(
            [sys.executable, "-c", script, "validate", adapter_repo / adapter / "adapter_config.json"],
            capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert done.stdout.strip() == f"{0 if adapter == 'good' else 3} []", done.stderr


def test_pre_commit_try_repo_passes_a_matching_adapter_and_fails_a_mismatched_one(adapter_repo, tmp_path):
    """The hook as pre-commit runs it: `.pre-commit-hooks.yaml` of this repository, on a scratch git repository."""
    import os
    import subprocess
    import sys

    if not (REPO / ".git").exists():
        pytest.skip("pre-commit try-repo needs this project as a git checkout")
    shim = tmp_path / "bin" / "loratool"  # `language: system`: the loratool installed where pre-commit runs
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lora_tools "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip

    def git(*words):
        subprocess.run(["git", *words], cwd=adapter_repo, env=env, check=True, capture_output=True)

    def try_repo():
        command = [sys.executable, "-m", "pre_commit", "try-repo", str(REPO), "loratool-check"]
        return subprocess.run(command, cwd=adapter_repo, env=env, capture_output=True, text=True, timeout=300)

    git("init", "-q")
    git("add", "base", "good")
    passed = try_repo()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "Passed" in passed.stdout
    git("commit", "-qm", "base and a fitting adapter")
    git("add", "bad")
    failed = try_repo()
    assert failed.returncode == 1 and "Failed" in failed.stdout
    assert "✗ " in failed.stdout and "no such module in the base" in failed.stdout and "exit code: 3" in failed.stdout


def _action() -> dict:
    import yaml

    return yaml.safe_load((REPO / "action.yml").read_text())


def test_action_yml_runs_its_scripts_with_the_inputs_they_read():
    action = _action()
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    cache = next(step for step in steps if step.get("uses", "").startswith("actions/cache@"))
    assert "${{ inputs.torch-version }}" in cache["with"]["key"] and "pip-cache" in cache["with"]["path"]
    scripts = {step["id"] if "id" in step else step["name"]: step for step in steps if "ci/" in step.get("run", "")}
    for step in scripts.values():
        script = REPO / step["run"].split('"$GITHUB_ACTION_PATH/')[1].split('"')[0]
        text = script.read_text()
        for name, value in step["env"].items():  # every input a script reads is passed, and from that input
            input_name = name.removeprefix("INPUT_").lower().replace("_", "-")
            assert name in text and value == "${{ inputs." + input_name + " }}"
    assert action["inputs"]["torch-version"]["default"] == "2.13.0"
    assert set(action["outputs"]) == {"report", "exit-code"}


def _recorded_install(tmp_path: Path, **inputs: str):
    import os
    import subprocess

    log = tmp_path / "pip.log"
    log.unlink(missing_ok=True)
    recorder = tmp_path / "pip"
    recorder.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    recorder.chmod(0o755)
    env = {**os.environ, "LORATOOL_PIP": str(recorder), "GITHUB_ACTION_PATH": str(REPO), **inputs}
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "action" / "install.sh")], env=env, capture_output=True, text=True
    )
    return done, (log.read_text().splitlines() if log.exists() else [])


def test_action_install_step_pins_a_cpu_torch_before_loratool(tmp_path):
    done, commands = _recorded_install(tmp_path, INPUT_TORCH="cpu", INPUT_TORCH_VERSION="2.13.0", INPUT_PACKAGE="")
    assert done.returncode == 0, done.stderr
    assert commands == ["install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", f"install {REPO}"]
    done, commands = _recorded_install(tmp_path, INPUT_TORCH="skip", INPUT_PACKAGE="lora-tools==0.1.0")
    assert done.returncode == 0 and commands == ["install lora-tools==0.1.0"]
    done, commands = _recorded_install(tmp_path, INPUT_TORCH="cuda")
    assert done.returncode == 2 and commands == [] and "::error title=loratool action::" in done.stdout


def _run_step(tmp_path: Path, command: str, **inputs: str):
    import os
    import subprocess
    import sys

    scratch = tmp_path / "runner"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(scratch / "output"),
           "GITHUB_STEP_SUMMARY": str(scratch / "summary.md"), "RUNNER_TEMP": str(scratch), "GITHUB_RUN_ID": "7",
           "INPUT_COMMAND": command, "INPUT_JSON": "true", "INPUT_FAIL": "true", **inputs,
           "LORATOOL": f"{sys.executable} -m lora_tools", "PYTHONPATH": str(REPO)}  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "action" / "run_loratool.py")], cwd=scratch, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    outputs = dict(line.split("=", 1) for line in (scratch / "output").read_text().splitlines())
    return done, outputs, scratch


def test_action_run_step_sets_outputs_keeps_the_report_and_annotates(mismatched, tmp_path):
    adapter, base = mismatched
    done, outputs, scratch = _run_step(tmp_path, f"loratool inspect '{adapter}' --base '{base}'")
    assert done.returncode == 3 and outputs["exit-code"] == "3"
    report = json.loads(Path(outputs["report"]).read_text())
    assert Path(outputs["report"]).parent == scratch and report["validation"]["compatible"] is False
    assert [c[0] for c in commands_in(done.stderr)] == ["error"]
    assert "loratool inspect: failed (exit 3)" in (scratch / "summary.md").read_text()
    kept, outputs, _ = _run_step(tmp_path, f"inspect '{adapter}' --base '{base}'", INPUT_FAIL="false")
    assert kept.returncode == 0 and outputs["exit-code"] == "3"


def test_action_run_step_without_a_report(tmp_path):
    done, outputs, _ = _run_step(tmp_path, f"inspect '{tmp_path / 'missing'}'")
    assert done.returncode == 3 and outputs == {"exit-code": "3", "report": ""}
    plain, outputs, _ = _run_step(tmp_path, "env", INPUT_JSON="false")
    assert plain.returncode == 0 and outputs == {"exit-code": "0", "report": ""} and "lora_tools" in plain.stdout
