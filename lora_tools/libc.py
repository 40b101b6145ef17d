"""The C library's functions that lora_tools calls through ctypes, each looked up once.

Looking a function up (`dlopen`, `dlsym`) takes the dynamic loader's lock, which a load
of torch's libraries holds for a fraction of a second (`compute.preload`): a lookup made
while it runs waits for the whole load. `resolve()` looks every one of them up before
that load starts, so their later callers (the output files' space, their writeback, the
allocator's setting) never wait for it.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["function", "resolve"]

_INT, _I64, _PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
#: name → (argument types, return type), per the Linux manual pages.
_SIGNATURES = {
    "dlopen": ((ctypes.c_char_p, _INT), _PTR),
    "fallocate64": ((_INT, _INT, _I64, _I64), _INT),
    "fallocate": ((_INT, _INT, _I64, _I64), _INT),
    "sync_file_range": ((_INT, _I64, _I64, ctypes.c_uint), _INT),
    "mallopt": ((_INT, _INT), _INT),
}


@functools.cache
def _library():
    """The process's global symbols (libc's among them, with errno kept for `ctypes.get_errno`), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.cache
def function(name: str):
    """libc's `name` (one of `_SIGNATURES`) with its argument and return types set, or None where it is absent."""
    library = _library()
    found = getattr(library, name, None) if library is not None else None
    if found is not None:
        found.argtypes, found.restype = _SIGNATURES[name]
    return found


def resolve() -> None:
    """Look every function up now (before a load of torch's libraries holds the loader's lock)."""
    for name in _SIGNATURES:
        function(name)
