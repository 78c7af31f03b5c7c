"""The inference HTTP server: EE-LLM's ``PUT /api``, OpenAI's ``POST /v1/completions`` (streaming too),
``GET /health`` and the playground page (``GET /``, files under ``GET /static/``, from the package's
``static/`` folder), served by a stdlib ``ThreadingHTTPServer`` on global rank 0.

Every rank of the model must call ``generate`` with the same request, so the server does not call the
model itself: it calls a *generate function* (injected; tests pass a fake one) through a
:class:`GenerationService`, whose lock serialises requests. On rank 0 of a multi-rank model that
function is :func:`~.server_ranks.distributed_generate`, which broadcasts the request to the other
ranks (sitting in :func:`~.server_ranks.worker_loop`) before generating and agrees with them afterwards;
the lock therefore also keeps two requests' collectives from interleaving (EE-LLM defined the lock but
never took it). :meth:`InferenceServer.stop` broadcasts the shutdown message that ends the workers'
loops. When the ranks can no longer agree the service fails for good: ``/health`` says so (503) and the
server stops, so that the process exits non-zero. Requests are checked before any rank sees them
(``request``, ``request_checks``); response bodies are built in ``server_responses``.

Limits (:class:`~.request.ServerLimits`, flags of the launcher): the body size (413), one deadline for
reading a request (408, or the connection is dropped while its headers are incomplete), the number of
open connections (503 beyond it); a body needs a ``Content-Length`` (411).
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from megatron.text_generation.request import (
    DEFAULT_LIMITS,
    SHUTDOWN,
    GenerationRequest,
    GenerationResult,
    RequestError,
    ServerLimits,
    broadcast_request,
    parse_api_request,
    parse_completions_request,
    show_value,
)
from megatron.text_generation.request_checks import check_request
from megatron.text_generation.server_ranks import (  # noqa: F401 -- distributed_generate, worker_loop: re-exported
    GenerateFn,
    RanksDiverged,
    accepts_stream,
    distributed_generate,
    worker_loop,
)
from megatron.text_generation.server_responses import (
    Completion,
    api_response,
    completion_chunks,
    completion_response,
    text_pieces,
)
from megatron.text_generation.streaming import delta_chunk, summary_chunk

__all__ = [
    "GenerateFn", "ModelInfo", "GenerationService", "ServiceClosed", "ServiceFailed", "RanksDiverged",
    "InferenceServer", "accepts_stream", "distributed_generate", "worker_loop",
]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}


@dataclass
class ModelInfo:
    """What the HTTP layer knows of the model: enough to reject requests that cannot run on it
    (``request_checks``)."""

    name: str = "ee-megatron"
    num_layers: int | None = None
    exit_layers: list[int] = field(default_factory=list)
    pp: int = 1
    max_positions: int | None = None  # context length: prompt + generated tokens must fit
    vocab_size: int | None = None  # token ids (stop tokens) must lie below it
    estimators: bool = False  # its exits have learned agreement estimators (--exit-estimator)
    tokenize: Callable[[str], list[int]] | None = None  # counts prompt tokens for OpenAI's ``usage``
    detokenize: Callable[[list[int]], str] | None = None  # streams the text token by token


class ServiceClosed(RuntimeError):
    """A request arrived after :meth:`GenerationService.close`."""


class ServiceFailed(RuntimeError):
    """A request arrived after the ranks stopped agreeing (:class:`RanksDiverged`): the server is exiting."""


class GenerationService:
    """Checks requests against the model and runs them one at a time through ``generate_fn``.

    ``state``: the rank-0 :class:`ParallelState` of a multi-rank model (``None`` for one process);
    :meth:`close` then broadcasts :data:`SHUTDOWN` to the ranks in :func:`worker_loop`. When
    ``generate_fn`` raises :class:`RanksDiverged` the service fails for good: :meth:`health` reports it,
    later requests get :class:`ServiceFailed` and the ``on_failure`` callbacks run (the HTTP server
    stops, so that the process exits non-zero)."""

    def __init__(self, generate_fn: GenerateFn, info: ModelInfo | None = None, state=None,
                 limits: ServerLimits = DEFAULT_LIMITS):
        self.generate_fn = generate_fn
        self.streams = accepts_stream(generate_fn)
        self.info = info or ModelInfo()
        self.state = state
        self.limits = limits
        self.requests_served = 0
        self.requests_failed = 0
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._running_since: float | None = None
        self._lock = threading.Lock()
        self._closed = False

    def check(self, request: GenerationRequest) -> None:
        """Model-dependent validation, done on rank 0 before anything is broadcast."""
        check_request(request, self.info, self.limits)

    def run(self, request: GenerationRequest, stream=None) -> GenerationResult:
        """``stream(Delta)`` receives the text as it is generated, when the generate function streams
        (:func:`accepts_stream`); else it is not called and the result comes whole."""
        self.check(request)
        with self._lock:
            if self.failure is not None:
                raise ServiceFailed(f"the server failed and is exiting: {self.failure}")
            if self._closed:
                raise ServiceClosed("the server is shutting down")
            self._running_since = time.monotonic()
            try:
                streaming = stream is not None and self.streams
                result = self.generate_fn(request, stream=stream) if streaming else self.generate_fn(request)
            except RanksDiverged as e:
                self._fail(str(e))
                raise
            except Exception:
                self.requests_failed += 1
                raise
            finally:
                self._running_since = None
            self.requests_served += 1
            return result

    def _fail(self, reason: str) -> None:
        log.error("the ranks can no longer agree: %s; the server stops", reason)
        self.failure, self.requests_failed = reason, self.requests_failed + 1
        for callback in self.on_failure:
            callback(reason)

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of ``GET /health``: 200 and ``"ok"``, or 503 and ``"failed"`` with the reason."""
        running = self._running_since
        body = {"status": "ok" if self.failure is None else "failed", "model": self.info.name,
                "num_layers": self.info.num_layers, "exit_layers": self.info.exit_layers,
                "requests_served": self.requests_served, "requests_failed": self.requests_failed,
                "busy_s": None if running is None else round(time.monotonic() - running, 3),
                "limits": asdict(self.limits)}
        if self.failure is not None:
            body["reason"] = self.failure
            return 503, body
        return 200, body

    def close(self, timeout: float = -1) -> None:
        """Refuse further requests, wait for the running one and release the worker ranks (idempotent).
        ``timeout`` (seconds; -1 waits forever): give up waiting for a request that hangs, e.g. after a
        rank died, so that the process can still exit (the launcher then ends the other ranks). After a
        failure the worker ranks cannot be released (they may sit in any collective): exiting ends them."""
        if not self._lock.acquire(timeout=timeout):
            log.error("a request is still running after %ss; exiting without releasing the worker ranks", timeout)
            self._closed = True
            return
        try:
            if not self._closed and self.state is not None and self.failure is None:
                broadcast_request(SHUTDOWN, self.state)
            self._closed = True
        finally:
            self._lock.release()


# ------------------------------------------------------------------------------------------------ HTTP

class _HTTPError(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error"))
        self.status, self.body = status, body


class _DeadlineIO(io.RawIOBase):
    """The connection's read side with one deadline for the whole request (request line, headers and
    body): a per-read timeout alone lets a client that sends a byte at a time hold its thread for ever."""

    def __init__(self, sock, seconds: float):
        self.sock, self.deadline = sock, time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


_CONTENT_LENGTH = re.compile(r"[0-9]+")


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: a stream ends when the connection does

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineIO(self.connection, self.server.service.limits.read_timeout_s))

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def __getattr__(self, name: str):
        # Any method without a do_* handler (DELETE, PATCH, made-up ones) is 405, not http.server's 501.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._send_json(405, {"error": f"method {show_value(self.command)} is not supported; use PUT /api, POST "
                                       "/v1/completions or GET /health"})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(*self.server.service.health())
        elif path in ("", "/playground"):
            self._send_static("index.html")
        elif path.startswith("/static/"):
            self._send_static(path[len("/static/"):])
        else:
            self._not_found()

    def _send_static(self, name: str) -> None:
        """A file of the playground: only plain names of files in ``STATIC_DIR`` (no paths)."""
        file = STATIC_DIR / name
        if any(c in name for c in "/\\\0") or file.suffix not in CONTENT_TYPES or not file.is_file():
            self._not_found()
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES[file.suffix])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path.rstrip("/") == "/api":
            self._serve(self._api)
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = self.path.rstrip("/")
        if path in ("/v1/completions", "/completions"):
            self._serve(self._completions)
        elif path == "/api":
            self._send_json(405, {"error": "use PUT /api (EE-LLM's method), or POST /v1/completions"})
        else:
            self._not_found()

    def _not_found(self) -> None:
        self._send_json(404, {"error": f"no endpoint {show_value(self.path)}; use PUT /api, POST /v1/completions, "
                                       "GET /health or GET / (the playground)"})

    def _serve(self, endpoint) -> None:
        try:
            endpoint(self._read_json())
        except _HTTPError as e:
            self._send_json(e.status, e.body)
        except RequestError as e:
            self._send_json(400, {"error": e.reason, "field": e.field})
        except (ServiceClosed, ServiceFailed) as e:
            self._send_json(503, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            log.debug("the client of %s left before its answer", self.path)
        except RanksDiverged as e:
            self._send_json(500, {"error": f"the ranks of the model can no longer agree ({e}); the server is "
                                           "exiting so that it can be restarted"})
        except Exception as e:  # noqa: BLE001 -- answer with a reason and keep serving
            log.exception("request to %s failed", self.path)
            self._send_json(500, {"error": f"internal error: {type(e).__name__}: {str(e)[:500]}"})

    def _read_json(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw)
        except RecursionError:
            raise RequestError("body", "the JSON is nested too deeply (no field needs more than two levels)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError("body", f"the body is not valid JSON: {str(e)[:200]}") from None

    def _read_body(self) -> bytes:
        """The body, sized by exactly one valid ``Content-Length`` no larger than the limit (chunked bodies
        are refused: 411), read within the request's deadline; a body shorter than announced is a 400."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _HTTPError(411, {"error": "chunked bodies are not supported; send a Content-Length header",
                                   "field": "Transfer-Encoding"})
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _HTTPError(411, {"error": "a Content-Length header is required", "field": "Content-Length"})
        if len(set(values)) > 1 or not _CONTENT_LENGTH.fullmatch(values[0].strip()):
            raise RequestError("Content-Length", f"must be one non-negative integer, got {show_value(values)}")
        digits, most = values[0].strip().lstrip("0") or "0", self.server.service.limits.max_body_bytes
        if len(digits) > len(str(most)) or int(digits) > most:  # the length test first: int() refuses 4,300 digits
            raise _HTTPError(413, {"error": f"the body ({digits[:40]} bytes) is over the server's "
                                            f"--max-body-bytes {most}", "field": "Content-Length"})
        length = int(digits)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise _HTTPError(408, {"error": "the client took too long to send the body", "field": "body"}) from None
        if len(raw) < length:
            raise RequestError("Content-Length", f"announces {length} bytes but the body ended after {len(raw)}")
        # the reply may take as long as the request could (the deadline above covers reading only)
        self.connection.settimeout(self.server.service.limits.read_timeout_s)
        return raw

    def _api(self, body: Any) -> None:
        request = parse_api_request(body, self.server.service.limits)
        start = time.perf_counter()
        result = self.server.service.run(request)
        elapsed = time.perf_counter() - start
        if not body.get("no_log", False):
            log.info("PUT /api: %d prompt(s), %d token(s) in %.3fs", len(request.prompts), result.num_generated,
                     elapsed)
        self._send_json(200, api_response(result, elapsed, self._pieces(request, result) if body.get("token_pieces")
                                          else None))

    def _pieces(self, request: GenerationRequest, result: GenerationResult) -> list[list[str]]:
        """``token_pieces``: each token's text, continuing its prompt's text (unless echoed)."""
        info = self.server.service.info
        if info.detokenize is None:
            return result.segments
        echo = request.sampling.echo_prompts or info.tokenize is None
        prompts = request.prompts  # beam search: every row continues the one prompt
        return [text_pieces(ids, info.detokenize, [] if echo else info.tokenize(prompts[i % len(prompts)]))
                for i, ids in enumerate(result.tokens)]

    def _completions(self, body: Any) -> None:
        request, options = parse_completions_request(body, self.server.service.limits)
        if options["stream"]:
            self._stream_completion(request, options)
            return
        result = self.server.service.run(request)
        self._send_json(200, completion_response(result, self._completion(request, options)))

    def _completion(self, request: GenerationRequest, options: dict) -> Completion:
        info = self.server.service.info
        prompt_tokens = sum(len(info.tokenize(p)) for p in request.prompts) if info.tokenize is not None else 0
        return Completion(request, options, f"cmpl-{time.time_ns():x}", int(time.time()), info.name, prompt_tokens,
                          info.detokenize)

    def _stream_completion(self, request: GenerationRequest, options: dict) -> None:
        """``stream: true``: a server-sent event per decided token run, written while the generation runs
        (tokens with their exit layers), then each choice's last text with its ``finish_reason``, a summary
        chunk (usage, exit share, tokens/s) and ``[DONE]``. The 200 goes out with the first event, so a
        request that fails before any token still gets its 400 / 500. A generate function that does not
        stream gets the whole result's chunks at the end."""
        c, events, last = self._completion(request, options), _EventStream(self), []

        def on_delta(delta) -> None:
            if delta.finished:  # its finish_reason needs the result
                last.append(delta)
            else:
                events.send(delta_chunk(c, delta))

        try:
            result = self.server.service.run(request, stream=on_delta)
        except Exception as e:  # noqa: BLE001 -- before the first event _serve answers it; after, the stream does
            if not events.started:
                raise
            log.exception("streamed request to %s failed", self.path)
            events.send({"error": f"internal error: {type(e).__name__}: {e}"})
            events.end()
            return
        if not last:
            for chunk in completion_chunks(result, c):
                events.send(chunk)
        else:
            for delta in last:
                events.send(delta_chunk(c, delta, c.finish_reason(result, delta.index)))
            events.send(summary_chunk(c, result))
        events.end()

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _EventStream:
    """Server-sent events on a handler's connection: the headers go out with the first event; a client
    that went away stops the writing (the generation still finishes, keeping every rank in step)."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler, self.started, self.gone = handler, False, False

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            if not self.started:
                self.started = True
                self.handler.send_response(200)
                self.handler.send_header("Content-Type", "text/event-stream")
                self.handler.send_header("Cache-Control", "no-cache")
                self.handler.end_headers()
            self.handler.wfile.write(data)
            self.handler.wfile.flush()
        except OSError:  # the client closed the connection
            self.gone = True

    def send(self, chunk: dict) -> None:
        self._write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def end(self) -> None:
        self._write(b"data: [DONE]\n\n")


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``limits.max_connections`` of them: a connection beyond that is
    answered 503 at once (it would otherwise be a thread, or wait unseen in the listen backlog)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, service: GenerationService):
        self.service = service
        self._slots = threading.BoundedSemaphore(service.limits.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request) -> None:
        body = json.dumps({"error": f"the server is at its --max-connections {self.service.limits.max_connections}; "
                                    "retry later"}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass  # the client is gone or not reading: nothing more to tell it
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # a client that disconnects mid-answer is not a server error worth a traceback on stderr
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class InferenceServer:
    """The HTTP front of a :class:`GenerationService` (global rank 0 only). ``port=0`` picks a free port.

    Either :meth:`serve_forever` in the calling thread (Ctrl-C / SIGTERM ends it) or :meth:`start` a
    background thread and :meth:`stop` it; both end by closing the service (releasing worker ranks).
    When the service fails (the ranks can no longer agree), the server keeps answering for
    ``failure_grace_s`` (``/health``: 503 ``"failed"`` with the reason, requests: 503), then stops:
    :meth:`serve_forever` returns 1, so that the process exits non-zero and a supervisor restarts it."""

    def __init__(self, service: GenerationService, host: str = "127.0.0.1", port: int = 5000,
                 failure_grace_s: float = 2.0):
        self.service = service
        self.httpd = _HTTPServer((host, port), service)
        self.failure_grace_s = failure_grace_s
        self._thread: threading.Thread | None = None
        service.on_failure.append(self._stop_later)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host}:{self.port}"

    @property
    def exit_code(self) -> int:
        """0, or 1 once the service failed."""
        return 0 if self.service.failure is None else 1

    def _stop_later(self, reason: str) -> None:
        def stop() -> None:
            time.sleep(self.failure_grace_s)
            log.error("stopping the server: %s", reason)
            self.httpd.shutdown()
        threading.Thread(target=stop, name="inference-http-stop", daemon=True).start()

    def serve_forever(self, close_timeout: float = 10.0) -> int:
        """Serve until interrupted (-> 0) or until the service fails (-> 1)."""
        log.info("serving on %s (PUT /api, POST /v1/completions, GET /health)", self.url)
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            log.info("interrupted; shutting down")
        finally:
            self.httpd.server_close()
            self.service.close(close_timeout)
        return self.exit_code

    def start(self) -> "InferenceServer":
        # A short poll keeps stop() quick (shutdown waits for the serving loop's next poll).
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="inference-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, close_timeout: float = -1) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.service.close(close_timeout)
