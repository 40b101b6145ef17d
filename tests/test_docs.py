"""The documentation site: it builds with `--strict`, and every example on it (and in the README) runs.

Which fenced blocks of `docs/pages/*.md` and `README.md` are examples:

- ```` ```console ```` blocks. A line starting with `$ ` is a command; the lines after it, up to the next
  `$ ` line, are the output the page shows for it. Every command must call `loratool`: it runs under
  bash in the page's working directory, with `loratool` on PATH as a two-line shim for
  `sys.executable -m lora_tools` (so shell forms such as `(ulimit -f 64; loratool ...)` run as shown).
  The command must exit 0, or N when its line ends with `# exit N`. Each shown output line must
  appear among the lines the command printed (stdout and stderr together), compared with runs of
  whitespace collapsed and any seconds figure (`0.6s`) matching any other. A shown line that is only
  `…` marks left-out lines and is not compared; a `…` inside a line stands for left-out text there
  (a path, a figure that differs from machine to machine), and the rest of the line must match.
- ```` ```python ```` blocks, run with `exec` in the page's working directory, one namespace per page.

Every other fence (`bash`, `yaml`, `text`) is not an example: set-up commands, CI files and commands of
other programs (vLLM, llama.cpp, Ollama, mlx-lm) go there. A console block without a loratool command
is an error, so nothing is skipped silently.

Each page runs once, its blocks in order, in a fresh directory holding `fixtures/` (a link to the
repository's) and the inputs `SETUP[page]` builds from the suite's own builders. The environment is the
suite's: `HF_HOME` in a temp dir and `HF_HUB_OFFLINE=1`; the Hub page talks to the loopback Hub
of `tests/hub_server.py` instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
from conftest import REPO

PAGES = REPO / "docs" / "pages"
COMMANDS = ["inspect", "merge", "unmerge", "extract", "resize", "combine", "convert", "check", "validate", "diff",
            "push", "env"]  # fmt: skip
PUBLIC_FUNCTIONS = ["merge", "unmerge", "extract", "resize", "combine", "convert", "inspect", "check", "push",
                    "open_checkpoint", "read_adapter"]  # fmt: skip
HUB_TOKEN = "hf_docsLoopbackToken"

# ---- reading the pages -------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w.+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?s\b")


@dataclass(frozen=True)
class Command:
    line: str  # as shown, without the `$ `
    shown: list[str]  # the output lines the page shows for it
    exit_code: int


@dataclass(frozen=True)
class Block:
    page: str
    number: int  # 1-based, among the page's example blocks
    lang: str  # "console" or "python"
    body: str

    @property
    def commands(self) -> list[Command]:
        commands: list[Command] = []
        for raw in self.body.splitlines():
            if raw.startswith("$ "):
                code = _EXIT.search(raw)
                commands.append(Command(raw[2:].strip(), [], int(code.group(1)) if code else 0))
            elif commands:
                commands[-1].shown.append(raw)
            elif raw.strip():
                raise AssertionError(f"{self.page} console block {self.number}: output before any `$ ` command")
        return commands


def example_blocks(page: Path) -> list[Block]:
    """The page's console and python blocks, in order (indented ones, inside lists, included)."""
    blocks = []
    for match in _FENCE.finditer(page.read_text()):
        if match.group("lang") in ("console", "python"):
            body = "\n".join(line.removeprefix(match.group("indent")) for line in match.group("body").splitlines())
            blocks.append(Block(page.name, len(blocks) + 1, match.group("lang"), body))
    return blocks


def _normalised(line: str) -> str:
    return _SECONDS.sub("<s>", " ".join(line.split()))


def _pattern(line: str) -> re.Pattern:
    """A shown line as a pattern over normalised printed lines: each `…` in it matches any text."""
    return re.compile(".*".join(re.escape(_normalised(part)) for part in line.split("…")))


def missing_lines(shown: list[str], printed: str) -> list[str]:
    """The shown lines (not elisions, not blank) that the command did not print."""
    printed_lines = {_normalised(line) for line in printed.splitlines()}
    missing = []
    for line in shown:
        if not line.strip() or line.strip() == "…":
            continue
        if "…" in line:
            pattern = _pattern(line)
            found = any(pattern.fullmatch(printed_line) for printed_line in printed_lines)
        else:
            found = _normalised(line) in printed_lines
        if not found:
            missing.append(line)
    return missing


# ---- inputs beyond the fixtures, built once per module at tiny sizes ---------------------------------------------


class Builds:
    """Inputs the pages name, each built on first use into `root` with the suite's builders."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @cached_property
    def flux(self) -> Path:
        """flux1-tiny.safetensors (BFL single file), flux-transformer/ (diffusers), qkv-lora / flux-lora."""
        import torch
        from diffusion_models import diffusers_to_original, flux_transformer
        from safetensors.torch import save_file

        from lora_tools.layouts.diffusion import detect_layout

        folder = self.root / "flux"
        folder.mkdir()
        model = flux_transformer()
        state = model.state_dict()
        save_file(diffusers_to_original(state, detect_layout(set(state)).links), folder / "flux1-tiny.safetensors")
        model.save_pretrained(folder / "flux-transformer")
        generator = torch.Generator().manual_seed(11)

        def lora(names: list[str]) -> dict:
            tensors = {}
            for name in names:
                rows, cols = state[f"{name}.weight"].shape
                key = f"transformer.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(4, cols, generator=generator) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.1
            return tensors

        qkv = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
        save_file(lora(qkv), folder / "qkv-lora.safetensors")
        save_file(lora([*qkv, "single_transformer_blocks.0.proj_mlp"]), folder / "flux-lora.safetensors")
        return folder

    @cached_property
    def quantized(self) -> Path:
        """tiny-llama-fp8/ (DeepSeek-V3-style FP8 blocks), tiny-lora/ for it, bnb/ (a bitsandbytes 4-bit base)."""
        import torch
        from conftest import build_model, lora_config, randomize_adapter
        from peft import get_peft_model
        from quant_models import quantize_llama
        from safetensors.torch import save_file

        folder = self.root / "quantized"
        plain = folder / "plain"
        sizes = dict(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
        build_model("llama", **sizes).save_pretrained(plain)
        quantize_llama(plain, folder / "tiny-llama-fp8", "fp8-block", torch.float32, (16, 16))
        peft_model = get_peft_model(build_model("llama", **sizes), lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # fmt: skip
        randomize_adapter(peft_model, seed=3)
        peft_model.save_pretrained(folder / "tiny-lora")
        bnb = folder / "bnb"
        bnb.mkdir()
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        save_file({q_proj: torch.zeros(512, 1, dtype=torch.uint8), f"{q_proj}.absmax": torch.ones(16),
                   f"{q_proj}.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)}, bnb / "model.safetensors")  # fmt: skip
        config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        (bnb / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
        return folder

    @cached_property
    def mixtral(self) -> Path:
        """mixtral/base and mixtral/adapter: the zoo's tiny Mixtral, an adapter on its fused experts."""
        from zoo_models import ZOO, build_case

        folder = self.root / "mixtral"
        build_case(next(arch for arch in ZOO if arch.name == "mixtral"), folder)
        return folder

    @cached_property
    def character(self) -> Path:
        """A second adapter for the fixture base (other targets, rank and alpha than the fixture's)."""
        from synthetic import write_lora_adapter

        return write_lora_adapter(
            self.root / "character", hidden=64, intermediate=128, layers=2, rank=8, heads=4, kv_heads=2,
            targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), alpha=8, seed=7,
        )  # fmt: skip


@dataclass
class Prepared:
    """What a page's set-up made ready: environment variables for its commands, and what it could not make.

    `unavailable` maps a word to the reason it is missing here (a filesystem this process may not mount):
    commands that contain the word are not run, and the page's test reports a skip naming them once
    everything else on it has run.
    """

    env: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _link(source: Path, workdir: Path, name: str | None = None) -> None:
    (workdir / (name or source.name)).symlink_to(source, target_is_directory=source.is_dir())


def _setup_flux(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    for item in builds.flux.iterdir():
        _link(item, workdir)
    return Prepared()


def _setup_quantized(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    for name in ("tiny-llama-fp8", "tiny-lora", "bnb"):
        _link(builds.quantized / name, workdir)
    return Prepared()


def _setup_inspect(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    _link(builds.quantized / "tiny-lora", workdir)  # made for a smaller Llama than the fixture's
    return Prepared()


def _setup_models(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    _link(builds.mixtral, workdir)
    return Prepared()


def _setup_combine(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    _link(REPO / "fixtures" / "tiny-llama-lora", workdir, "style")
    _link(builds.character, workdir)
    return Prepared()


def _setup_notes(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    """notes.txt: a file where an output path needs a folder."""
    (workdir / "notes.txt").write_text("a file, not a folder\n")
    return Prepared()


def _mount(args: list[str]) -> str | None:
    """Run mount/umount; the reason it failed, or None."""
    try:
        done = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        return f"no {args[0]} command"
    return None if done.returncode == 0 else done.stderr.strip() or f"{args[0]} exited {done.returncode}"


def _setup_failures(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    """notes.txt, and readonly/: a small tmpfs mounted read-only (Linux, with the right to mount)."""
    _setup_notes(workdir, builds, stack)
    readonly = workdir / "readonly"
    readonly.mkdir()
    failed = (
        "tmpfs mounts are Linux-only"
        if not sys.platform.startswith("linux")
        else _mount(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(readonly)])
    )
    if failed:
        return Prepared(unavailable={"readonly/": f"cannot mount a read-only tmpfs here ({failed})"})

    def unmount() -> None:
        if _mount(["umount", str(readonly)]):
            _mount(["umount", "-l", str(readonly)])

    stack.callback(unmount)
    return Prepared()


def _setup_hub(workdir: Path, builds: Builds, stack: ExitStack) -> Prepared:
    """A loopback Hub holding the fixtures as `meta-llama/Llama-3.2-1B` and `my-org/my-lora` (branch v2)."""
    from hub_server import FakeHub

    hub = stack.enter_context(FakeHub(HUB_TOKEN))

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    hub.add_files("meta-llama/Llama-3.2-1B", files(REPO / "fixtures" / "tiny-llama"))
    hub.add_files("my-org/my-lora", files(REPO / "fixtures" / "tiny-llama-lora"), branch="v2")
    return Prepared(dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN=HUB_TOKEN))


#: page → what it needs beyond `fixtures/`.
SETUP: dict[str, Callable[[Path, Builds, ExitStack], Prepared]] = {
    "diffusion.md": _setup_flux,
    "convert.md": _setup_flux,
    "quantized.md": _setup_quantized,
    "inspect.md": _setup_inspect,
    "models.md": _setup_models,
    "combine.md": _setup_combine,
    "failures.md": _setup_failures,
    "bugs.md": _setup_notes,
    "hub.md": _setup_hub,
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Builds:
    return Builds(tmp_path_factory.mktemp("docs_inputs"))


# ---- running the examples ----------------------------------------------------------------------------------------


def _shim(folder: Path) -> Path:
    """A `loratool` on PATH that is `sys.executable -m lora_tools`."""
    folder.mkdir()
    shim = folder / "loratool"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lora_tools "$@"\n')
    shim.chmod(0o755)
    return folder


def _environment(tmp_path: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORATOOL_"))}
    env.pop("COLUMNS", None)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PATH"] = f"{_shim(tmp_path / 'bin')}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_console(block: Block, workdir: Path, env: dict, unavailable: dict[str, str] | None = None) -> list[str]:
    """Run the block's commands; returns those not run (with why) because they need something unavailable."""
    commands = block.commands
    assert commands, f"{block.page} console block {block.number} has no `$ ` command"
    not_run = []
    for command in commands:
        where = f"{block.page} console block {block.number}: $ {command.line}"
        assert re.search(r"(^|[\s(;&|])loratool\s", command.line + " "), f"{where}: not a loratool command"
        reasons = [reason for word, reason in (unavailable or {}).items() if word in command.line]
        if reasons:
            not_run.append(f"{where}: {reasons[0]}")
            continue
        done = subprocess.run(["bash", "-c", command.line], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        printed = done.stdout + done.stderr
        assert done.returncode == command.exit_code, (
            f"{where}: exit {done.returncode}, not {command.exit_code}\n{printed}"
        )
        missing = missing_lines(command.shown, printed)
        assert not missing, f"{where}: printed no line like {missing}\nit printed:\n{printed}"
    return not_run


def run_python(block: Block, namespace: dict) -> None:
    code = compile(block.body, f"{block.page} python block {block.number}", "exec")
    exec(code, namespace)


def _pages() -> list[str]:
    return sorted(p.name for p in PAGES.glob("*.md"))


def _example_file(page: str) -> Path:
    """A page of the site, or the README (the front page, whose tour runs like any page)."""
    return REPO / page if page == "README.md" else PAGES / page


@pytest.mark.parametrize("page", [*_pages(), "README.md"])
def test_examples_run(page, builds, tmp_path, monkeypatch):
    blocks = example_blocks(_example_file(page))
    if not blocks:
        return
    workdir = tmp_path / "work"
    workdir.mkdir()
    _link(REPO / "fixtures", workdir)
    not_run: list[str] = []
    with ExitStack() as stack:
        prepared = SETUP[page](workdir, builds, stack) if page in SETUP else Prepared()
        env = _environment(tmp_path, prepared.env)
        monkeypatch.chdir(workdir)
        for key in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_TOKEN"):
            if key in env:
                monkeypatch.setenv(key, env[key])
        namespace: dict = {"__name__": f"docs_{page.removesuffix('.md')}"}
        for block in blocks:
            if block.lang == "console":
                not_run += run_console(block, workdir, env, prepared.unavailable)
            else:
                run_python(block, namespace)
    if not_run:
        pytest.skip("every other example ran; not run here: " + "; ".join(not_run))


def test_setup_names_only_pages_that_exist():
    assert set(SETUP) <= set(_pages())


# ---- the site ----------------------------------------------------------------------------------------------------


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", REPO / "docs" / "mkdocs.yml", "-d", site],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    api = (site / "api" / "index.html").read_text()
    for name in PUBLIC_FUNCTIONS:
        assert re.search(rf'id="lora_tools\.[\w.]*\b{name}"', api), f"API page lacks {name}"
    assert 'id="lora_tools.errors.LoraToolError"' in api
    cli = (site / "cli" / "index.html").read_text()
    assert "Usage: loratool [OPTIONS] COMMAND [ARGS]..." in cli
    for name in COMMANDS:
        assert f"Usage: loratool {name} [OPTIONS]" in cli, f"CLI page lacks {name}"
    assert (site / "img" / "inspect-stats-tiny-llama.png").is_file()


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav():
    import yaml

    nav = _nav_pages(yaml.safe_load((REPO / "docs" / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == _pages(), "docs/mkdocs.yml's nav must list every page of docs/pages once"


def test_api_page_documents_every_export():
    """Each name `lora_tools` exports has a `:::` directive (the error classes through `lora_tools.errors`)."""
    import lora_tools
    from lora_tools import errors

    directives = re.findall(r"^::: ([\w.]+)\s*$", (PAGES / "api.md").read_text(), re.M)
    documented = {directive.rpartition(".")[2] for directive in directives}
    if "lora_tools.errors" in directives:
        documented |= set(errors.__all__)
    assert not [name for name in lora_tools.__all__ if name != "__version__" and name not in documented]


def _workflow_commands(text: str) -> list[list[str]]:
    """The loratool command lines of the workflow's `run:` steps, as argument lists."""
    import shlex

    import yaml

    (body,) = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    commands = []
    for step in yaml.safe_load(body)["jobs"]["merge"]["steps"]:
        lexer = shlex.shlex(step.get("run", ""), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, "&&"]:
            if word in ("&&", "||", ";", "|", ">"):
                if words[:1] == ["loratool"]:
                    commands.append(words[1:])
                words = [] if word != ">" else [">"]
            elif words[:1] != [">"]:
                words.append(word)
    return commands


def test_workflow_example_commands_parse():
    """The CI workflow on the Hub page is not run (it needs GitHub and the real Hub), but its commands parse."""
    from lora_tools.cli import cli

    commands = _workflow_commands((PAGES / "hub.md").read_text())
    assert [args[0] for args in commands] == ["merge", "merge", "diff"]
    for name, *args in commands:
        cli.commands[name].make_context(name, args)  # raises click's usage error on an unknown option or bad value


def test_cli_help_renders_without_torch():
    """The hook's help rendering, in a fresh process: torch stays unimported."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('hooks', {str(REPO / 'docs' / 'hooks.py')!r})\n"
        "hooks = importlib.util.module_from_spec(spec); spec.loader.exec_module(hooks)\n"
        "text = hooks.render_cli_help()\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', len(text))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("NO-TORCH")


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "mkdocs serve -f docs/mkdocs.yml" in readme
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    for name in COMMANDS:
        assert any(line.startswith(f"| `{name}`") for line in table), f"README's command table lacks {name}"
    links = re.findall(r"\]\((docs/pages/[^)#]+)(?:#[^)]*)?\)", readme)
    assert links and not [link for link in links if not (REPO / link).is_file()]


def test_example_rules(tmp_path):
    """The runner's own rules, on made-up text."""
    block = Block("x.md", 1, "console", "$ loratool diff a b  # exit 3\nsame  line 0.4s\n…\n$ loratool env\n")
    first, second = block.commands
    assert (first.exit_code, second.exit_code, first.shown) == (3, 0, ["same  line 0.4s", "…"])
    assert missing_lines(first.shown, "same line 12.0s\n") == []
    assert missing_lines(["other"], "same line\n") == ["other"]
    assert missing_lines(["error: a … b", " … "], "error: a x y b\n") == []
    assert missing_lines(["error: a … c"], "error: a x y b\n") == ["error: a … c"]
    page = tmp_path / "page.md"
    page.write_text("text\n\n- item\n\n  ```console\n  $ loratool env\n  ```\n\n```bash\necho no\n```\n")
    (found,) = example_blocks(page)
    assert (found.lang, found.body) == ("console", "$ loratool env")
    needs_mount = Block("x.md", 1, "console", "$ loratool resize a -r 2 -o readonly/b")
    assert run_console(needs_mount, tmp_path, {}, {"readonly/": "no mount"}) == [
        "x.md console block 1: $ loratool resize a -r 2 -o readonly/b: no mount"
    ]
