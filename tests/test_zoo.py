"""The architecture zoo: for every family, `loratool merge` equals PEFT's merge_and_unload in the checkpoint's own
on-disk names, and transformers loads the output with the logits of the unmerged PeftModel."""

from __future__ import annotations

import pytest
import torch
from conftest import load_state
from ulp import ulp_at
from zoo_models import ZOO, Arch, build_case, inputs_for

import lora_tools

_BY_NAME = {arch.name: arch for arch in ZOO}


@pytest.fixture(scope="session")
def zoo_case(tmp_path_factory):
    """Builds each architecture's base and adapter once per session, on first use."""
    built: dict[str, tuple] = {}

    def get(arch: Arch):
        if arch.name not in built:
            built[arch.name] = build_case(arch, tmp_path_factory.mktemp(f"zoo_{arch.name}"))
        return built[arch.name]

    return get


def _peft(arch: Arch, base, adapter, dtype):
    from peft import PeftModel

    return PeftModel.from_pretrained(arch.model_class.from_pretrained(base, dtype=dtype), adapter).eval()


def _merged_by_peft(arch: Arch, base, adapter, dtype, folder):
    _peft(arch, base, adapter, dtype).merge_and_unload().save_pretrained(folder)
    return load_state(folder)


def _assert_as_exact(name: str, ours: torch.Tensor, peft: torch.Tensor, exact: torch.Tensor) -> None:
    """Each element within 1 ulp of PEFT's, or closer to the fp64 merge than PEFT's is."""
    assert ours.dtype == peft.dtype and ours.shape == peft.shape, (name, ours.dtype, peft.dtype)
    if not ours.is_floating_point():
        assert torch.equal(ours, peft), name
        return
    within_ulp = (ours.double() - peft.double()).abs() <= ulp_at(peft)
    closer = (ours.double() - exact).abs() <= (peft.double() - exact).abs()
    bad = ~(within_ulp | closer)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements neither within 1 ulp of PEFT nor closer to fp64"


def _logits(model, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(arch)).logits.float()


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_merge_equals_peft_in_disk_names(arch: Arch, zoo_case, tmp_path):
    base, adapter = zoo_case(arch)
    report = lora_tools.merge(base, [adapter], tmp_path / "ours", device="cpu")
    assert not report.warnings
    ours = load_state(tmp_path / "ours")
    peft = _merged_by_peft(arch, base, adapter, arch.dtype, tmp_path / "peft")
    exact = _merged_by_peft(arch, base, adapter, torch.float64, tmp_path / "peft64")
    original = load_state(base)
    assert set(ours) == set(original) == set(peft)
    changed = [name for name in ours if not torch.equal(ours[name], original[name])]
    assert len(changed) == report.tensors_changed > 0
    for name, tensor in ours.items():
        # transformers keeps some tensors in fp32 in memory (DeepSeek's router); PEFT saves them so
        _assert_as_exact(name, tensor, peft[name].to(tensor.dtype), exact[name])

    unmerged = _logits(_peft(arch, base, adapter, torch.float32), arch)
    merged = _logits(arch.model_class.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval(), arch)
    tolerance = 1e-4 if arch.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_layout_table_agrees_with_save_pretrained(arch: Arch, zoo_case):
    """Every in-memory tensor, mapped by lora_tools' table, is exactly what transformers' save_pretrained wrote."""
    from lora_tools.layouts.transformers import disk_tensor_names, layout_for

    base, _ = zoo_case(arch)
    model = arch.build()
    model_type, layout = layout_for(model.config.to_dict())
    assert model_type == arch.model_type
    experts = next((p.shape[0] for n, p in model.named_parameters() if n.endswith("experts.down_proj")), 0)
    seen, memory = set(), []
    for name, tensor in model.state_dict().items():  # persistent tensors; a tied copy is saved once
        if tensor.data_ptr() not in seen or not tensor.numel():
            seen.add(tensor.data_ptr())
            memory.append(name)
    mapped = {disk for name in memory for disk in disk_tensor_names(name, layout, experts)}
    assert mapped == set(load_state(base))
