"""The adapter registry as data: every format that writes modules reads back what it wrote."""

from __future__ import annotations

import pytest
import torch

from lora_tools.adapters.model import ModuleFactors
from lora_tools.adapters.peft import WEIGHTS_NAME, peft_adapter_config, write_adapter_config
from lora_tools.adapters.registry import FORMATS, format_named, module_writer, read_adapter
from lora_tools.errors import InvalidInputError
from lora_tools.io.spool import Spool

#: A module name each format can spell (kohya's underscored names, diffusers' component prefix).
NAMES = {
    "peft": "model.layers.0.self_attn.q_proj",
    "peft-safetensors": "model.layers.0.self_attn.q_proj",
    "kohya": "lora_unet_down_blocks_0_attentions_0_proj_in",
    "diffusers": "unet.down_blocks.0.attentions.0.proj_in",
}


def _written(fmt: str, tmp_path, factors: ModuleFactors):
    spool = Spool(tmp_path / ".factors.spool")
    module_writer(fmt)(spool, factors)
    if fmt != "peft":
        spool.finish(tmp_path / "adapter.safetensors")
        return tmp_path / "adapter.safetensors"
    folder = tmp_path / "adapter"
    folder.mkdir()
    spool.finish(folder / WEIGHTS_NAME)
    rank = factors.down.shape[0]
    config = peft_adapter_config(
        {factors.name: rank}, {factors.name: factors.alpha}, base_model=None, fan_in_fan_out=False, modules_to_save=[]
    )
    write_adapter_config(folder, config)
    return folder


def _read_back(fmt: str, tmp_path, dora: bool):
    torch.manual_seed(0)
    down, up, magnitude = torch.randn(4, 16), torch.randn(12, 4), torch.rand(12) + 0.5
    path = _written(fmt, tmp_path, ModuleFactors(NAMES[fmt], down, up, 6.0, magnitude if dora else None))
    adapter = read_adapter(path, alpha=6.0 if fmt == "peft-safetensors" else None)
    assert adapter.format == fmt and not adapter.unknown_keys, adapter.unknown_keys
    (module,) = adapter.modules
    delta = module.scale * (adapter.read(module.b_key).double() @ adapter.read(module.a_key).double())
    torch.testing.assert_close(delta, 1.5 * (up.double() @ down.double()), rtol=1e-6, atol=1e-7)
    if dora:
        assert torch.equal(adapter.read(module.magnitude_key).reshape(-1), magnitude)


WRITERS = [f.name for f in FORMATS if f.write_module is not None]


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_module_writer_reads_back_the_same_change(fmt, tmp_path):
    """s·B·A read back through the registry equals the one written (alpha 6 on rank 4: scale 1.5)."""
    assert set(NAMES) == set(WRITERS), "a new writer needs a module name here"
    _read_back(fmt, tmp_path, dora=False)


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_module_writer_reads_back_dora_magnitudes(fmt, tmp_path):
    _read_back(fmt, tmp_path, dora=True)


def test_formats_written_whole_have_no_module_writer():
    assert format_named("gguf").write_module is None and format_named("mlx").write_module is None
    with pytest.raises(InvalidInputError, match="no module writer for adapter format 'gguf'.*peft, diffusers"):
        module_writer("gguf")
