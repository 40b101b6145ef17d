"""Staging tensors onto a device while the previous one computes, through a small stream interface.

`Stager` is the pipeline: a helper thread reads the next tensor into one of a few
reusable (pinned, on CUDA) host buffers and starts its copy to the device on a side
stream; the compute thread takes it once the copy has landed. Everything the pipeline
needs from a device goes through `DeviceStreams`, which has a CUDA implementation and
a CPU one (a helper thread plays the side stream, a future plays the event), so
buffer reuse, errors raised while staging and cancellation are exercised by the CPU
test suite; only the CUDA calls themselves need a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceStreams", "CudaStreams", "CpuStreams", "Stager", "streams_for"]


class DeviceStreams(Protocol):
    """What staging needs from a device: host buffers, an asynchronous upload, and events."""

    device: Any

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer that uploads can read from asynchronously (pinned on CUDA)."""

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying `host` to the device on the side stream; return the device tensor and an event."""

    def wait_host(self, event: Any) -> None:
        """Block this (host) thread until the copy behind `event` finished, so its host buffer can be reused."""

    def consume(self, tensor: torch.Tensor, event: Any) -> torch.Tensor:
        """`tensor`, made safe to use on the compute stream once the copy behind `event` has landed."""


class CudaStreams:
    """`DeviceStreams` for one CUDA device: pinned buffers, a side stream and CUDA events."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        import torch

        with torch.cuda.stream(self.stream):
            on_device = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return on_device, ready

    def wait_host(self, event: Any) -> None:
        event.synchronize()

    def consume(self, tensor: torch.Tensor, event: Any) -> torch.Tensor:
        import torch

        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        tensor.record_stream(current)
        return tensor


class CpuStreams:
    """`DeviceStreams` simulated on the CPU: a helper thread is the side stream, a future the event.

    Behaves like a device with asynchronous copies (the upload returns before the bytes
    have moved), so the pipeline's ordering mistakes show up as wrong bytes in CPU tests.
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.side = ThreadPoolExecutor(1, thread_name_prefix="loratool-side-stream")

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def _copy(self, target: torch.Tensor, host: torch.Tensor) -> None:
        target.copy_(host)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Future]:
        import torch

        on_device = torch.empty_like(host)
        return on_device, self.side.submit(self._copy, on_device, host)

    def wait_host(self, event: Future) -> None:
        event.result()

    def consume(self, tensor: torch.Tensor, event: Future) -> torch.Tensor:
        event.result()
        return tensor

    def close(self) -> None:
        self.side.shutdown(wait=True, cancel_futures=True)


def streams_for(device: torch.device) -> DeviceStreams | None:
    """The streams that stage tensors for `device`, or None where compute reads the mapped file directly."""
    return CudaStreams(device) if device.type == "cuda" else None


class Stager:
    """Reads the next tensor into a reusable host buffer and uploads it on a side stream, one ahead.

    `depth` host buffers are used in turn; a buffer is refilled only once the upload
    that last read it has finished. Errors raised while reading or uploading surface
    from `take`. `close` cancels what has not started and waits for what has (a
    Ctrl-C during a copy leaves no copy reading a freed buffer or a closed mapping).
    """

    def __init__(self, streams: DeviceStreams, depth: int = 2) -> None:
        self.streams = streams
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="loratool-stage")
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._events: list[Any] = [None] * depth
        self._turn = 0

    def stage(self, read: Callable[[], Any]) -> Future:
        """Start staging the tensor `read()` opens (a context manager yielding a CPU tensor)."""
        slot = self._turn
        self._turn = (slot + 1) % len(self._buffers)
        return self.reader.submit(self._load, read, slot)

    def _host(self, slot: int, nbytes: int) -> torch.Tensor:
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[slot] = self.streams.host_buffer(nbytes)
        return buffer

    def _load(self, read: Callable[[], Any], slot: int):
        if self._events[slot] is not None:  # the upload that last read this buffer must be done
            self.streams.wait_host(self._events[slot])
            self._events[slot] = None
        with read() as view:
            nbytes = view.numel() * view.element_size()
            host = self._host(slot, nbytes)[:nbytes].view(view.dtype).view(view.shape)
            host.copy_(view)
        on_device, ready = self.streams.upload(host)
        self._events[slot] = ready
        return on_device, ready

    def take(self, staged: Future) -> torch.Tensor:
        """The staged tensor, usable on the compute stream (re-raises what went wrong while staging)."""
        on_device, ready = staged.result()
        return self.streams.consume(on_device, ready)

    def close(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)
        for event in self._events:
            if event is not None:
                with suppress(Exception):  # the error, if any, was already raised by `take`
                    self.streams.wait_host(event)
        close = getattr(self.streams, "close", None)
        if close is not None:
            close()
