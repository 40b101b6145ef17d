"""PEFT's multiplicative tuners: W transformed, and back (un-merge), in the dtype it is given (fp64 here).

IA3 scales W's rows (or, for feedforward modules, its columns) and, outside feedforward
modules, the bias; OFT and BOFT rotate W's input side by block-diagonal orthogonal
matrices (Cayley parametrisation, PEFT's Neumann series by default, COFT's projection,
shared blocks), BOFT scaling the rows after; HRA multiplies W by Householder reflections;
MiSS' "bat" init maps each r×r block W_b to W_b + W_b·B + B. Each follows the
tuner's `merge`/`unmerge` in PEFT (`peft/tuners/<name>/layer.py`); the inverses are
exact (IA3 divides by the scales, refusing zeros; OFT/BOFT invert the rotations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedError

__all__ = ["ia3", "oft", "boft", "hra", "miss_bat", "cayley_neumann", "cayley"]

Tensor = torch.Tensor
Factor = Callable[[str], Tensor]


def _rows(weight: Tensor) -> Tensor:
    """The 2-D view PEFT rotates: out × (in·kh·kw)."""
    return weight.reshape(weight.shape[0], -1)


def ia3(factor: Factor, params: dict, weight: Tensor, *, inverse: bool, bias: bool, name: str) -> Tensor:
    """W·l per output row (per input column for feedforward modules); a bias is scaled as the rows are."""
    scales = factor("l").reshape(-1)
    if inverse and bool((scales == 0).any()):
        raise UnsupportedError(
            f"{name}: its IA3 scales hold {int((scales == 0).sum())} zero(s), so the merge cannot be undone "
            "(the scaled rows are gone)"
        )
    if bias:
        shaped = scales
    else:
        axis = 1 if params["feedforward"] else 0
        if params.get("fan_in_fan_out") and weight.dim() == 2:
            axis = 1 - axis
        view = [1] * weight.dim()
        view[axis] = -1
        shaped = scales.reshape(view)
    return weight / shaped if inverse else weight * shaped


def _skew(vectors: Tensor, size: int) -> Tensor:
    """Skew-symmetric size×size matrices from their upper triangles (row-major, as PEFT stores them)."""
    rows, cols = torch.triu_indices(size, size, 1, device=vectors.device)
    matrix = vectors.new_zeros(vectors.shape[0], size, size)
    matrix[:, rows, cols] = vectors
    return matrix - matrix.transpose(-2, -1)


def cayley_neumann(skew: Tensor, terms: int) -> Tensor:
    """PEFT's truncated series for the Cayley transform: I + 2Q + 2Q² + … + 2Qᵏ + Qᵏ⁺¹, with the
    number of powers exactly as PEFT's `_cayley_batch` takes them for `num_cayley_neumann_terms`."""
    result = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).repeat(skew.shape[0], 1, 1)
    if terms > 1:
        result = result + 2 * skew
    if terms > 2:
        power = skew @ skew
        result = result + 2 * power
        for _ in range(3, terms - 1):
            power = power @ skew
            result = result + 2 * power
        result = result + power @ skew
    return result


def cayley(skew: Tensor) -> Tensor:
    """(I − Q)(I + Q)⁻¹, the exact Cayley transform PEFT solves for."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def _coft(vectors: Tensor, size: int, eps: float) -> Tensor:
    """COFT: each block's skew matrix pulled back to Frobenius norm ≤ eps/√blocks, as PEFT projects it."""
    limit = eps / torch.sqrt(torch.tensor(float(vectors.shape[0]))).item()
    norms = _skew(vectors, size).flatten(1).norm(dim=1, keepdim=True)
    return torch.where(norms <= limit, vectors, limit * (vectors / norms))


def _block_size(elements: int) -> int:
    size = 1
    while size * (size - 1) // 2 < elements:
        size += 1
    return size


def _rotate(rows: Tensor, blocks: Tensor, *, right: bool) -> Tensor:
    """rows·BDᵀ (right=False: PEFT's linear/conv merge, (BD·Wᵀ)ᵀ) or rows·BD (embeddings), BD the
    block-diagonal matrix of `blocks` [k, b, b], applied block by block."""
    count, size = blocks.shape[0], blocks.shape[-1]
    split = rows.reshape(rows.shape[0], count, size)
    pattern = "okj,kji->oki" if right else "okj,kij->oki"
    return torch.einsum(pattern, split, blocks).reshape(rows.shape)


def oft(factor: Factor, params: dict, weight: Tensor, *, inverse: bool, embedding: bool = False) -> Tensor:
    """W·Rᵀ with R block-diagonal orthogonal (an embedding: W·R), or back with R⁻¹."""
    vectors = factor("R")
    size = _block_size(vectors.shape[1])
    if params["coft"]:
        vectors = _coft(vectors, size, params["eps"])
    skew = _skew(vectors, size)
    blocks = cayley_neumann(skew, params["num_cayley_neumann_terms"]) if params["use_cayley_neumann"] else cayley(skew)
    rows = _rows(weight)
    count = rows.shape[1] // size
    if params["block_share"]:
        blocks = blocks[:1].expand(count, size, size)
    if inverse:
        blocks = torch.linalg.inv(blocks)
    return _rotate(rows, blocks, right=embedding).reshape(weight.shape)


def boft(factor: Factor, params: dict, weight: Tensor, *, inverse: bool) -> Tensor:
    """(W·Rᵀ)⊙s per output row, R the block-diagonal Cayley rotations of one butterfly factor."""
    raw = factor("R")[0]
    skew = 0.5 * (raw - raw.transpose(-2, -1))
    blocks = cayley(skew)
    scales = factor("s").reshape(-1, 1)
    rows = _rows(weight)
    if inverse:
        return _rotate(rows / scales, torch.linalg.inv(blocks), right=False).reshape(weight.shape)
    return (_rotate(rows, blocks, right=False) * scales).reshape(weight.shape)


def _gram_schmidt(vectors: Tensor) -> Tensor:
    columns = []
    for index in range(vectors.shape[1]):
        column = vectors[:, index : index + 1]
        for done in columns:
            column = column - (done.T @ column) * done
        columns.append(column / column.norm())
    return torch.cat(columns, dim=1)


def hra(factor: Factor, params: dict, weight: Tensor, *, inverse: bool) -> Tensor:
    """W·H₁·H₂·…·H_r, H_i = I − 2uᵢuᵢᵀ (unit uᵢ), applied one reflection at a time; back in reverse
    order. With apply_GS the uᵢ are orthonormalised first and H = I − 2UUᵀ (its own inverse)."""
    vectors = factor("u")
    rows = _rows(weight)
    if params["apply_GS"]:
        basis = _gram_schmidt(vectors)
        return (rows - 2 * (rows @ basis) @ basis.T).reshape(weight.shape)
    units = vectors / vectors.norm(dim=0)
    order = range(units.shape[1] - 1, -1, -1) if inverse else range(units.shape[1])
    for index in order:
        unit = units[:, index : index + 1]
        rows = rows - 2 * (rows @ unit) @ unit.T
    return rows.reshape(weight.shape)


def miss_bat(factor: Factor, params: dict, weight: Tensor, *, inverse: bool) -> Tensor:
    """MiSS "bat": every r×r block W_b → W_b + W_b·B + B (B per row of blocks); back: (W_b − B)(I + B)⁻¹."""
    block = factor("block")
    size = block.shape[-1]
    out, inp = weight.shape[0], weight.numel() // weight.shape[0]
    tiles = weight.reshape(out // size, size, inp // size, size).permute(2, 0, 1, 3)
    if inverse:
        eye = torch.eye(size, dtype=block.dtype, device=block.device)
        result = (tiles - block) @ torch.linalg.inv(eye + block)
    else:
        result = tiles + tiles @ block + block
    return result.permute(1, 2, 0, 3).reshape(weight.shape)
