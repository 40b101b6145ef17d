"""Choosing the compute device from a user's `--device` spelling."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DeviceUnavailableError, InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "resolve_devices", "device_names"]


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N|mps` into a usable `torch.device`.

    `auto` takes CUDA when present, then MPS, else the CPU.

    Raises:
        DeviceUnavailableError: the device named does not exist on this machine.
        InvalidInputError: the spelling is not a device.
    """
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InvalidInputError(f"--device {spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index if device.index is not None else 0
        if index >= count:
            raise DeviceUnavailableError(
                f"--device {spec}: this machine has {count} CUDA device(s); use --device cpu or auto"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceUnavailableError(f"--device {spec}: MPS is not available here; use --device cpu or auto")
        return device
    raise InvalidInputError(f"--device {spec!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")


def resolve_devices(spec: str = "auto") -> list[torch.device]:
    """Turn a comma-separated list (`cuda:0,cuda:1`) into usable devices; one spelling gives one device.

    Raises:
        InvalidInputError: a device is named twice, or devices of different kinds are mixed.
        DeviceUnavailableError: see `resolve_device`.
    """
    devices = [resolve_device(part) for part in spec.split(",")] if "," in spec else [resolve_device(spec)]
    kinds = {device.type for device in devices}
    if len(kinds) > 1:
        raise InvalidInputError(f"--device {spec}: list devices of one kind (e.g. cuda:0,cuda:1)")
    if devices[0].type == "cuda" and len(set(devices)) < len(devices):
        raise InvalidInputError(f"--device {spec}: a device is named twice")
    return devices


def device_names(devices: list) -> str:
    """The devices a report names, comma-separated (`cpu`, `cuda:0,cuda:1`)."""
    return ",".join(str(d) for d in devices)
