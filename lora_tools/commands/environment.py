"""What a bug report needs to know about this machine: versions, devices, the Hub cache.

Versions are read from installed package metadata, so optional libraries (transformers,
peft, diffusers, gguf …) are reported without being imported. Whether a Hub token is
configured is reported as yes or no; the token itself is never read into the report.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field

from ..version import __version__

__all__ = ["EnvironmentReport", "collect_environment", "LIBRARIES"]

#: Distributions whose versions matter to lora_tools, core ones first; None when not installed.
LIBRARIES = (
    "torch",
    "safetensors",
    "huggingface-hub",
    "click",
    "rich",
    "numpy",
    "transformers",
    "peft",
    "diffusers",
    "gguf",
    "mlx",
    "mlx-lm",
    "lycoris-lora",
    "matplotlib",
    "ray",
)


@dataclass(frozen=True)
class EnvironmentReport:
    """Versions, compute devices and Hub settings of the running interpreter."""

    lora_tools: str
    python: str
    platform: str
    libraries: dict[str, str | None]
    cpu_count: int | None
    usable_cpus: int | None
    cuda_available: bool
    cuda_devices: list[str] = field(default_factory=list)
    cuda_version: str | None = None
    mps_available: bool = False
    hf_home: str = ""
    hf_hub_cache: str = ""
    hf_hub_offline: bool = False
    hf_endpoint: str = ""
    token_configured: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _devices() -> dict:
    """CUDA and MPS availability, and the CUDA device names (torch is imported here, not at start-up)."""
    try:
        import torch
    except ImportError:
        return {"cuda_available": False, "mps_available": False}
    cuda = torch.cuda.is_available()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"cuda_available": cuda, "cuda_devices": names, "cuda_version": torch.version.cuda, "mps_available": mps}


def _hub_settings() -> dict:
    from huggingface_hub import constants, get_token

    return {
        "hf_home": str(constants.HF_HOME),
        "hf_hub_cache": str(constants.HF_HUB_CACHE),
        "hf_hub_offline": bool(constants.HF_HUB_OFFLINE),
        "hf_endpoint": str(constants.ENDPOINT),
        "token_configured": get_token() is not None,
    }


def collect_environment() -> EnvironmentReport:
    """Gather everything `loratool env` reports. Never includes a token, only whether one is set."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return EnvironmentReport(
        lora_tools=__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        libraries={name: _version(name) for name in LIBRARIES},
        cpu_count=os.cpu_count(),
        usable_cpus=usable,
        **_devices(),
        **_hub_settings(),
    )
