"""Retries for every request huggingface_hub makes for lora_tools: backoff, jitter, Retry-After, a time bound.

huggingface_hub retries only some of its calls (`http_backoff` around LFS and
preupload requests, 408/429 on file GETs), a fixed number of times with no
jitter and no bound on the total time; repo info, 5xx on downloads and the
commit call are not retried at all. So lora_tools gives huggingface_hub's shared
HTTP client (through its own hook, `set_client_factory`) a `send` that retries
each request on connection errors, timeouts, HTTP 5xx and 429 — never another
4xx — with exponential backoff and jitter, waiting at least what the Hub asks
(`Retry-After`, or the `RateLimit` header that huggingface_hub's
`parse_ratelimit_headers` reads), for at most `LORATOOL_HUB_RETRY_SECONDS`
from the request's first failure. Each retry is reported as one note. When the
bound is reached the request raises `HubRetriesExhausted`, which no
huggingface_hub layer catches or retries, and `io.hub` turns it into the message.
Once one request has given up, the others try once (until one succeeds), so a
Hub that stays down ends the run within the bound.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import OptionValueError

__all__ = [
    "RETRY_SECONDS_VARIABLE",
    "RETRY_BASE_VARIABLE",
    "CONNECT_SECONDS",
    "RetryPolicy",
    "HubRetriesExhausted",
    "install_retries",
    "set_retry_reporter",
    "hub_note",
]

RETRY_SECONDS_VARIABLE = "LORATOOL_HUB_RETRY_SECONDS"
RETRY_BASE_VARIABLE = "LORATOOL_HUB_RETRY_BASE_SECONDS"
_DEFAULT_SECONDS, _DEFAULT_BASE, _LONGEST_WAIT = 300.0, 1.0, 60.0
#: A connection that cannot be made at all (no route, DNS, refused) is retried for at most this long: a busy
#: Hub answers, an unplugged network rarely comes back within minutes, and a warm cache waits behind it.
CONNECT_SECONDS = 30.0

#: Requests huggingface_hub makes on its own, best effort (it ignores their failure): tried once.
BEST_EFFORT_PATHS = frozenset({"/api/agent-harnesses"})

_gave_up = threading.Event()  # set when a request has used its whole bound; cleared by any success
_report: list[Callable[[str], None]] = []


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry: `seconds` from a request's first failure, waits from `base` doubling."""

    seconds: float = _DEFAULT_SECONDS
    base: float = _DEFAULT_BASE

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        return cls(_seconds(RETRY_SECONDS_VARIABLE, _DEFAULT_SECONDS), _seconds(RETRY_BASE_VARIABLE, _DEFAULT_BASE))

    def backoff(self, attempt: int) -> float:
        """Wait before attempt `attempt + 1`: base·2^(attempt−1), capped, with jitter over its upper half."""
        ceiling = min(_LONGEST_WAIT, self.base * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise OptionValueError(f"{variable}={text!r}: expected a number of seconds (0 or more)")
    return value


class HubRetriesExhausted(Exception):
    """A Hub request still failed when its retry bound ran out (or after one try, once another request gave up)."""

    def __init__(self, method: str, url: str, attempts: int, seconds: float, status: int | None, cause: str) -> None:
        self.method, self.url, self.attempts, self.seconds = method, url, attempts, seconds
        self.status, self.cause = status, cause
        super().__init__(f"{cause} on {method} {_short(url)} after {attempts} attempt(s) over {seconds:.0f} s")

    @property
    def host(self) -> str:
        return urlparse(self.url).netloc


def set_retry_reporter(report: Callable[[str], None] | None) -> None:
    """Where each retry's note goes (the CLI prints it on stderr); None: the `lora_tools` logger."""
    _report[:] = [report] if report is not None else []


def hub_note(line: str) -> None:
    """One line for the user about the Hub (a retry, a download done again): to the reporter, or the logger."""
    if _report:
        _report[0](line)
    else:
        import logging

        logging.getLogger("lora_tools").warning(line)


def install_retries() -> None:
    """Make huggingface_hub's shared client retry (once per process; a client factory set by the caller is kept).

    Raises:
        OptionValueError: LORATOOL_HUB_RETRY_SECONDS or LORATOOL_HUB_RETRY_BASE_SECONDS is not a number of seconds.
    """
    RetryPolicy.from_environment()
    from huggingface_hub.utils import _http

    if getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is _http.default_client_factory:
        _http.set_client_factory(_retrying_client)


def _retrying_client():
    """huggingface_hub's default client (its request hook, redirects, no timeout), with retries in `send`."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    retryable = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)

    class RetryingClient(httpx2.Client):
        def send(self, request, **kwargs):
            return _send_with_retries(lambda: httpx2.Client.send(self, request, **kwargs), request, retryable)

    return RetryingClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=None)


def _send_with_retries(send: Callable, request, retryable: tuple[type[BaseException], ...]):
    """Send until a response that is not 429/5xx, or the bound; a body that cannot be re-read is sent once,
    and so is a best-effort request."""
    policy = RetryPolicy.from_environment()
    rewind = None if request.url.path in BEST_EFFORT_PATHS else _rewinder(request)
    first_failure, attempt = None, 0
    while True:
        attempt += 1
        try:
            response, error = send(), None
        except retryable as exc:
            if rewind is None:
                raise
            response, error = None, exc
        if response is not None and not _retryable_status(response.status_code):
            _gave_up.clear()
            return response
        if response is not None and rewind is None:
            return response  # huggingface_hub's own handling (and its http_backoff) decide
        status = None if response is None else response.status_code
        cause = type(error).__name__ if response is None else f"HTTP {status}"
        asked = None if response is None else _asked_wait(response)
        wait = max(asked or 0.0, policy.backoff(attempt))
        first_failure = first_failure or time.monotonic()
        elapsed = time.monotonic() - first_failure
        if response is not None:
            response.close()
        bound = min(policy.seconds, CONNECT_SECONDS) if _cannot_connect(error) else policy.seconds
        if _gave_up.is_set() or elapsed + wait > bound:
            _gave_up.set()
            raise HubRetriesExhausted(request.method, str(request.url), attempt, elapsed, status, cause) from error
        hub_note(f"hub: {cause} on {request.method} {_short(str(request.url))}, "
              f"retrying in {_duration(wait)} (attempt {attempt + 1})")  # fmt: skip
        time.sleep(wait)
        rewind()


def _cannot_connect(error: BaseException | None) -> bool:
    """The request never reached a server (httpx's ConnectError: name resolution, no route, refused)."""
    return error is not None and type(error).__name__ == "ConnectError"


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _asked_wait(response) -> float | None:
    """Seconds the Hub asked us to wait: Retry-After (seconds or an HTTP date), or a 429's exhausted RateLimit."""
    from email.utils import parsedate_to_datetime  # here: email imports socket, which a local run never needs

    from huggingface_hub.utils import parse_ratelimit_headers

    limit = parse_ratelimit_headers(response.headers) if response.status_code == 429 else None
    if limit is not None and limit.remaining == 0:
        return float(limit.reset_in_seconds)
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time()) if value else None
    except (TypeError, ValueError):
        return None


def _rewinder(request) -> Callable[[], None] | None:
    """How to send the request's body again: nothing to do for bytes, seek back for a file; None if it cannot be."""
    import httpx2

    stream = request.stream
    if isinstance(stream, httpx2.ByteStream):
        return lambda: None
    source = getattr(stream, "_stream", None)  # httpx2 reads a file body with read(); seek back to re-send it
    if hasattr(source, "seek") and hasattr(source, "tell"):
        start = source.tell()
        return lambda: source.seek(start)
    return None


def _short(url: str) -> str:
    """The URL's path (no host, no query string) for notes and messages."""
    return urlparse(url).path or url


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"
