"""Property tests: hostile safetensors headers and adapter configs never crash loratool.

Every example must end in exit code 0 or 3, with no traceback, and leave nothing
outside the example's own temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from conftest import REPO, run_cli
from hostile import write_raw_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIXTURE_BASE = REPO / "fixtures" / "tiny-llama"
FIXTURE_ADAPTER = REPO / "fixtures" / "tiny-llama-lora"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F7", "", "f32"])
entries = (
    st.fixed_dictionaries(
        {
            "dtype": dtypes,
            "shape": st.lists(st.integers(-2, 6), max_size=3),
            "data_offsets": st.lists(st.integers(-1, 200), min_size=0, max_size=3),
        }
    )
    | json_values
)
headers = st.dictionaries(
    st.sampled_from(["a", "b", "model.norm.weight", "__metadata__", "lm_head.weight"]), entries, max_size=4
)


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


class _Sandbox:
    """A fresh folder per example; checks nothing appears beside it or in the repository."""

    def __enter__(self) -> Path:
        self.parent = Path(tempfile.mkdtemp(prefix="loratool-fuzz-"))
        self.folder = self.parent / "work"
        self.folder.mkdir()
        self.repo_before = _snapshot(REPO / "fixtures")
        self.cwd = os.getcwd()
        os.chdir(self.folder)
        return self.folder

    def __exit__(self, *exc) -> None:
        os.chdir(self.cwd)
        assert [p.name for p in self.parent.iterdir()] == ["work"], "something was written beside the sandbox"
        assert _snapshot(REPO / "fixtures") == self.repo_before
        shutil.rmtree(self.parent)


def _assert_clean(result) -> None:
    assert result.exit_code in (0, 3), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    if result.exit_code == 3:
        assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data=st.binary(max_size=64), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_safetensors_headers(header, data, raw):
    with _Sandbox() as folder:
        base = folder / "base"
        base.mkdir()
        shutil.copy(FIXTURE_BASE / "config.json", base / "config.json")
        write_raw_safetensors(base / "model.safetensors", header, data, raw)
        _assert_clean(run_cli(["inspect", base, "--json"]))
        result = run_cli(["merge", base, FIXTURE_ADAPTER, "-o", folder / "out", "-q", "--device", "cpu"])
        _assert_clean(result)
        if result.exit_code == 3:
            assert sorted(p.name for p in folder.iterdir()) == ["base"]


config_fields = st.sampled_from(
    ["r", "lora_alpha", "peft_type", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out",
     "modules_to_save", "target_modules", "trainable_token_indices", "base_model_name_or_path"]
)  # fmt: skip


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(config_fields, json_values, min_size=1, max_size=3))
def test_fuzzed_adapter_configs(changes):
    with _Sandbox() as folder:
        adapter = folder / "adapter"
        shutil.copytree(FIXTURE_ADAPTER, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config.update(changes)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        _assert_clean(run_cli(["inspect", adapter, "--base", FIXTURE_BASE, "--json"]))
        result = run_cli(["merge", FIXTURE_BASE, adapter, "-o", folder / "out", "-q", "--device", "cpu"])
        _assert_clean(result)
        expected = ["adapter", "out"] if result.exit_code == 0 else ["adapter"]
        assert sorted(p.name for p in folder.iterdir()) == expected
