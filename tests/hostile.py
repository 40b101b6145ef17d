"""Builders for malformed files, shared by the bad-input tests and the fuzz test."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_raw_safetensors(path: Path, header: object, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    """Write a safetensors file with exactly this header (any JSON value) and data."""
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path
