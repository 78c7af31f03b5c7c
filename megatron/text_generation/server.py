"""The inference HTTP server: EE-LLM's ``PUT /api``, OpenAI's ``POST /v1/completions`` (streaming too),
``GET /health`` and the playground page (``GET /``, files under ``GET /static/``, from the package's
``static/`` folder), served by a stdlib ``ThreadingHTTPServer`` on global rank 0.

Every rank of the model must call ``generate`` with the same request, so the server does not call the
model itself: it calls a *generate function* (injected; tests pass a fake one) through a
:class:`GenerationService`, whose lock serialises requests. On rank 0 of a multi-rank model that
function is :func:`distributed_generate`, which broadcasts the request to the other ranks (sitting in
:func:`worker_loop`) before generating; the lock therefore also keeps two requests' collectives from
interleaving (EE-LLM defined the lock but never took it). :meth:`InferenceServer.stop` broadcasts the
shutdown message that ends the workers' loops. Response bodies are built in ``server_responses``.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from megatron.text_generation.request import (
    SHUTDOWN,
    GenerationRequest,
    GenerationResult,
    RequestError,
    broadcast_request,
    parse_api_request,
    parse_completions_request,
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
    "GenerateFn", "ModelInfo", "GenerationService", "ServiceClosed", "InferenceServer", "distributed_generate",
    "accepts_stream", "worker_loop", "MAX_BODY_BYTES",
]

log = logging.getLogger(__name__)

GenerateFn = Callable[[GenerationRequest], GenerationResult]
MAX_BODY_BYTES = 16 << 20
STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}


@dataclass
class ModelInfo:
    """What the HTTP layer knows of the model: enough to reject requests that cannot run on it."""

    name: str = "ee-megatron"
    num_layers: int | None = None
    exit_layers: list[int] = field(default_factory=list)
    pp: int = 1
    max_positions: int | None = None  # context length: prompt + generated tokens must fit
    tokenize: Callable[[str], list[int]] | None = None  # counts prompt tokens for OpenAI's ``usage``
    detokenize: Callable[[list[int]], str] | None = None  # streams the text token by token


class ServiceClosed(RuntimeError):
    """A request arrived after :meth:`GenerationService.close`."""


class GenerationService:
    """Checks requests against the model and runs them one at a time through ``generate_fn``.

    ``state``: the rank-0 :class:`ParallelState` of a multi-rank model (``None`` for one process);
    :meth:`close` then broadcasts :data:`SHUTDOWN` to the ranks in :func:`worker_loop`."""

    def __init__(self, generate_fn: GenerateFn, info: ModelInfo | None = None, state=None):
        self.generate_fn = generate_fn
        self.streams = accepts_stream(generate_fn)
        self.info = info or ModelInfo()
        self.state = state
        self.requests_served = 0
        self._lock = threading.Lock()
        self._closed = False

    def check(self, request: GenerationRequest) -> None:
        """Model-dependent validation, done on rank 0 before anything is broadcast."""
        ee, exits = request.early_exit, self.info.exit_layers
        unknown = sorted(set(ee.exit_layers) - set(exits))
        if unknown:
            raise RequestError("exit_layers", f"layers {unknown} have no exit; this model's exits are {exits}")
        if ee.use_early_exit and not exits:
            raise RequestError("use_early_exit", "this model has no exits; drop use_early_exit")
        if ee.method == "pipeline" and self.info.pp == 1:
            raise RequestError("method", "the pipeline method needs pipeline parallelism (pp > 1); use "
                                         "'recompute' or 'auto'")
        if ee.decoding == "speculative":
            self._check_speculative(request)
        self._check_length(request)

    def _check_speculative(self, request: GenerationRequest) -> None:
        exits, layer = self.info.exit_layers, request.early_exit.draft_exit_layer
        if not exits:
            raise RequestError("decoding", "this model has no exits to draft with; use decoding 'full'")
        if layer is not None and layer not in exits:
            raise RequestError("draft_exit_layer", f"layer {layer} has no exit; this model's exits are {exits}")
        if layer is not None and self.info.num_layers is not None and layer >= self.info.num_layers:
            raise RequestError("draft_exit_layer", f"layer {layer} is the full depth: drafting there saves "
                                                   "nothing; pick an earlier exit")
        if request.sampling.beam_width is not None:
            raise RequestError("beam_width", "beam search runs at full depth; use decoding 'full'")

    def _check_length(self, request: GenerationRequest) -> None:
        """Rejecting an over-long request here matters beyond the message: a rank that fails half-way
        through a generation leaves the others waiting in a collective."""
        info, s = self.info, request.sampling
        if info.max_positions is None or info.tokenize is None:
            return
        longest = max(len(info.tokenize(p)) for p in request.prompts) + int(s.add_BOS)
        if longest + s.tokens_to_generate > info.max_positions:
            field = "tokens_to_generate" if longest < info.max_positions else "prompts"
            raise RequestError(field, f"the longest prompt ({longest} tokens) plus tokens_to_generate "
                                      f"({s.tokens_to_generate}) exceeds the model's {info.max_positions} positions; "
                                      f"ask for at most {max(info.max_positions - longest, 0)} tokens or shorten it")

    def run(self, request: GenerationRequest, stream=None) -> GenerationResult:
        """``stream(Delta)`` receives the text as it is generated, when the generate function streams
        (:func:`accepts_stream`); else it is not called and the result comes whole."""
        self.check(request)
        with self._lock:
            if self._closed:
                raise ServiceClosed("the server is shutting down")
            streaming = stream is not None and self.streams
            result = self.generate_fn(request, stream=stream) if streaming else self.generate_fn(request)
            self.requests_served += 1
            return result

    def close(self, timeout: float = -1) -> None:
        """Refuse further requests, wait for the running one and release the worker ranks (idempotent).
        ``timeout`` (seconds; -1 waits forever): give up waiting for a request that hangs, e.g. after a
        rank died, so that the process can still exit (the launcher then ends the other ranks)."""
        if not self._lock.acquire(timeout=timeout):
            log.error("a request is still running after %ss; exiting without releasing the worker ranks", timeout)
            self._closed = True
            return
        try:
            if not self._closed and self.state is not None:
                broadcast_request(SHUTDOWN, self.state)
            self._closed = True
        finally:
            self._lock.release()


def accepts_stream(generate_fn) -> bool:
    """Whether ``generate_fn`` takes a ``stream`` callback (``generation.generate`` does)."""
    try:
        params = inspect.signature(generate_fn).parameters
    except (TypeError, ValueError):
        return False
    return "stream" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def distributed_generate(generate_fn: GenerateFn, state) -> GenerateFn:
    """Rank 0's generate function of a multi-rank model: broadcast the request, then generate with it.
    Must run under :class:`GenerationService`'s lock (it does, as the service's ``generate_fn``). The
    stream callback, when ``generate_fn`` takes one, stays on rank 0."""
    if accepts_stream(generate_fn):
        def run_streaming(request: GenerationRequest, stream=None) -> GenerationResult:
            return generate_fn(broadcast_request(request, state), stream=stream)
        return run_streaming

    def run(request: GenerationRequest) -> GenerationResult:
        return generate_fn(broadcast_request(request, state))
    return run


def worker_loop(generate_fn: GenerateFn, state) -> int:
    """Every rank but global 0: receive each broadcast request and generate with it, until
    :data:`SHUTDOWN`. Returns the number of requests served. A failing request is logged and the loop
    goes on: rank 0 raised the same error (same request, same model) and answered it with a 500."""
    served = 0
    while True:
        request = broadcast_request(None, state)
        if isinstance(request, str) and request == SHUTDOWN:
            return served
        try:
            generate_fn(request)
        except Exception:  # noqa: BLE001 -- the worker must outlive one bad request, like rank 0
            log.exception("rank %s: request failed", getattr(state, "rank", "?"))
        served += 1


# ------------------------------------------------------------------------------------------------ HTTP

class _HTTPError(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error"))
        self.status, self.body = status, body


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: a stream ends when the connection does

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            svc = self.server.service
            self._send_json(200, {"status": "ok", "model": svc.info.name, "num_layers": svc.info.num_layers,
                                  "exit_layers": svc.info.exit_layers, "requests_served": svc.requests_served})
        elif path in ("", "/playground"):
            self._send_static("index.html")
        elif path.startswith("/static/"):
            self._send_static(path[len("/static/"):])
        else:
            self._not_found()

    def _send_static(self, name: str) -> None:
        """A file of the playground: only plain names of files in ``STATIC_DIR`` (no paths)."""
        file = STATIC_DIR / name
        if "/" in name or "\\" in name or file.suffix not in CONTENT_TYPES or not file.is_file():
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
        self._send_json(404, {"error": f"no endpoint {self.path}; use PUT /api, POST /v1/completions, "
                                       "GET /health or GET / (the playground)"})

    def _serve(self, endpoint) -> None:
        try:
            endpoint(self._read_json())
        except _HTTPError as e:
            self._send_json(e.status, e.body)
        except RequestError as e:
            self._send_json(400, {"error": e.reason, "field": e.field})
        except ServiceClosed as e:
            self._send_json(503, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 -- answer with a reason and keep serving
            log.exception("request to %s failed", self.path)
            self._send_json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _HTTPError(411, {"error": "a Content-Length header is required"}) from None
        if length > MAX_BODY_BYTES:
            raise _HTTPError(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"})
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError("body", f"the body is not valid JSON: {e}") from None

    def _api(self, body: Any) -> None:
        request = parse_api_request(body)
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
        request, options = parse_completions_request(body)
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
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, service: GenerationService):
        self.service = service
        super().__init__(address, _Handler)


class InferenceServer:
    """The HTTP front of a :class:`GenerationService` (global rank 0 only). ``port=0`` picks a free port.

    Either :meth:`serve_forever` in the calling thread (Ctrl-C / SIGTERM ends it) or :meth:`start` a
    background thread and :meth:`stop` it; both end by closing the service (releasing worker ranks)."""

    def __init__(self, service: GenerationService, host: str = "127.0.0.1", port: int = 5000):
        self.service = service
        self.httpd = _HTTPServer((host, port), service)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def serve_forever(self, close_timeout: float = 10.0) -> None:
        log.info("serving on %s (PUT /api, POST /v1/completions, GET /health)", self.url)
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            log.info("interrupted; shutting down")
        finally:
            self.httpd.server_close()
            self.service.close(close_timeout)

    def start(self) -> "InferenceServer":
        # A short poll keeps stop() quick (shutdown waits for the serving loop's next poll).
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="inference-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.service.close()
