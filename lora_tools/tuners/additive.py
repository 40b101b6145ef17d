"""ΔW of PEFT's additive tuners, from a module's tensors, its parameters and the base weight's shape.

Each function follows the tuner's `get_delta_weight` in PEFT (`peft/tuners/<name>/layer.py`)
and returns ΔW laid out like the base weight, scale included, in the dtype of the
tensors it is given (`tuners.tuner_delta` gives fp64: these tensors are small). Where PEFT's own
merge rounds ΔW to the base dtype before adding it (RandLoRA, C3A), or builds a
circulant through FFTs, this computes the exact value; the merge rounds once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["adalora", "vera", "fourierft", "miss", "randlora", "shira", "c3a", "paca", "UnfitTensors"]

Tensor = torch.Tensor
Factor = Callable[[str], Tensor]


class UnfitTensors(ValueError):
    """A module's saved values cannot be its own (their shapes fit, their contents do not)."""


def _out_in(shape: torch.Size, params: dict) -> tuple[int, int]:
    """(out, in) features; a GPT-2 Conv1D weight (fan_in_fan_out) is stored in×out."""
    if params.get("fan_in_fan_out") and len(shape) == 2:
        return shape[1], shape[0]
    return shape[0], int(torch.Size(shape[1:]).numel())


def _laid_out(delta: Tensor, shape: torch.Size, params: dict) -> Tensor:
    """An out×in ΔW in the base weight's layout (transposed for Conv1D, reshaped for conv)."""
    if params.get("fan_in_fan_out") and len(shape) == 2:
        delta = delta.T
    return delta.reshape(shape)


def adalora(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """B·(A⊙E)·scaling/(ranknum + 1e-5): ranknum is the initial rank, kept when training prunes some."""
    a, b, e = factor("A"), factor("B"), factor("E")
    ranknum = float(torch.tensor(params["ranknum"], dtype=torch.float32) + 1e-5)  # PEFT adds in fp32
    delta = (b @ (a * e)) * params["scaling"] / ranknum
    return _laid_out(delta, shape, params)


def vera(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """(λ_b ⊙ B[:out])·(λ_d ⊙ A[:, :in]): the shared random projections sliced to the layer."""
    out, inp = _out_in(shape, params)
    a, b = factor("A")[:, :inp], factor("B")[:out, :]
    delta = (factor("b").unsqueeze(-1) * b) @ (factor("d").unsqueeze(-1) * a)
    return _laid_out(delta, shape, params)


def fourier_indices(out: int, inp: int, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """The (row, column) of each FourierFT coefficient: PEFT draws them with `torch.randperm` from
    a CPU generator seeded with `random_loc_seed`, so the same draw gives the same spectrum."""
    drawn = torch.randperm(out * inp, generator=torch.Generator().manual_seed(int(seed)))[:count]
    return drawn // inp, drawn % inp


def fourierft(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """Re(IFFT2(dense spectrum))·scaling, the spectrum's entries placed at PEFT's drawn positions."""
    out, inp = _out_in(shape, params)
    spectrum = factor("spectrum").reshape(-1)
    rows, cols = (i.to(spectrum.device) for i in fourier_indices(out, inp, spectrum.numel(), params["seed"]))
    dense = spectrum.new_zeros(out, inp)
    dense[rows, cols] = spectrum
    delta = torch.fft.ifft2(dense).real * params["scaling"]
    return _laid_out(delta, shape, params)


def miss(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """MiSS (default and "mini" init): the r×out block added to every r columns, ΔW[o, c] = block[c mod r, o].

    "mini" stores r×mini_r and repeats it across the outputs. ("bat" is a transform: `transforms.miss_bat`.)
    """
    out, inp = shape[0], int(torch.Size(shape[1:]).numel())
    block = factor("block")
    if params["fn"] == "mini":
        block = block.repeat(1, out // params["mini_r"])
    columns = torch.arange(inp, device=block.device) % block.shape[0]
    return block[columns].T.reshape(shape)


def randlora(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """Σ over bases of B_i·diag(λ_i)·A_i·diag(γ_i), scaled by randlora_alpha/r, as PEFT's
    `get_scaled_bases` orders the shared random bases (A scaled on the layer's smaller side)."""
    out, inp = _out_in(shape, params)
    lam, gamma = factor("lambda"), factor("gamma")
    low, high, bases = min(out, inp), max(out, inp), lam.shape[1]
    scaled = (lam[:, :, None] * factor("A")[:, :bases, :low] * gamma[None]).flatten(end_dim=1)
    wide = factor("B")[:high, :bases, :].flatten(start_dim=1)
    delta = wide @ scaled if low == inp else (wide @ scaled).T
    return _laid_out(delta * params["scaling"], shape, params)


def shira(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """The sparse ΔW: each weight at its saved (row, column); repeated positions add, as a COO tensor does."""
    out, inp = _out_in(shape, params)
    values, indices = factor("weight").reshape(-1), factor("indices").long()
    delta = values.new_zeros(out, inp)
    delta.index_put_((indices[0], indices[1]), values, accumulate=True)
    return _laid_out(delta, shape, params)


def c3a(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """Block-circulant ΔW / in_features: block (m, n) has entry [s, t] = kernel[m, n, (t − s) mod b]
    (what PEFT's `get_circulant_fast` builds through FFTs, here without their rounding)."""
    kernel = factor("kernel")
    rows, cols, size = kernel.shape
    step = torch.arange(size, device=kernel.device)
    blocks = kernel[:, :, (step[None, :] - step[:, None]) % size]  # [m, n, s, t]
    delta = blocks.permute(0, 2, 1, 3).reshape(rows * size, cols * size)
    return (delta / shape[-1]).reshape(shape)


def paca(factor: Factor, params: dict, shape: torch.Size) -> Tensor:
    """PaCA (PEFT 0.22): the saved update of the chosen input columns (`paca_delta`, out×k), times
    paca_alpha / r, in those columns (`paca_indices`); every other column is unchanged.

    Raises:
        UnfitTensors: the indices are not k distinct input columns of the layer.
    """
    out, inp = _out_in(shape, params)
    columns, indices = factor("delta"), factor("indices").long()
    if indices.numel() and (
        int(indices.min()) < 0 or int(indices.max()) >= inp or indices.unique().numel() != len(indices)
    ):
        raise UnfitTensors(f"paca_indices {indices.tolist()} are not distinct input columns of a {out}×{inp} layer")
    delta = columns.new_zeros(out, inp)
    delta[:, indices] = columns * params["scaling"]
    return delta.reshape(shape)
