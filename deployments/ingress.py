"""The OpenAI-compatible HTTP ingress: FastAPI on Serve, one `LLMServer` deployment per model."""

import asyncio
import time
from dataclasses import replace
from typing import AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import bearer_token, key_accepted, load_admin_key, load_api_keys
from deployments.config import ServeConfig
from deployments.guard import Guard, GuardSettings
from deployments.limits import check_limits
from deployments.mirror import Mirror, NoController, controller_view
from deployments.priority import step_back
from deployments.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, error_body
from deployments.responses import ChoiceState, ResponseBuilder, sse_event

app = FastAPI(title="Helios", description="OpenAI-compatible serving of early-exit LLMs")
app.add_middleware(Guard)  # keys, body size and shutdown are checked before FastAPI parses a byte
CARD_TTL_S = 5.0  # how long /v1/models may show a card read earlier

# every status a /v1 route answers besides 200, each with OpenAI's error body (FastAPI's 422 never
# happens: validation errors are 400s, as OpenAI's are)
_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in [
    (400, "invalid request: bad JSON, parameter, model or prompt"), (401, "missing or wrong API key"),
    (404, "unknown route"), (413, "request body over limits.max_body_bytes"),
    (503, "a model's queue is full, the server answers its limit of requests, or it is shutting down "
          "(Retry-After)")]}
_GENERATION = {200: {"description": "a JSON body, or server-sent events with `stream: true`",
                     "content": {"text/event-stream": {"schema": {  # each event: a JSON chunk, or [DONE]
                         "type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}}}},
               **_ERRORS}


def _openapi() -> dict:
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


class ShuttingDown(Exception):
    """Shutdown's grace period ended before this request did."""


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind, exc.code), exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for item in exc.errors():
        if item["type"] == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {item['ctx']['error']}"), 400)
        where = ".".join(str(part) for part in item["loc"] if part != "body")
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return JSONResponse(error_body("; ".join(problems)), 400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, headers=exc.headers)  # 405: Allow


async def _first(stream: DeploymentResponseGenerator) -> dict:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return {"error": "the model returned nothing"}


# A replica that the HELIOS controller has replaced hands back requests it has not started (see
# LLMServer.generate); they are sent again after a pause that doubles, while Serve's routers learn
# that the old replica stops. The last attempt may not be handed off: whoever gets it serves it.
HANDOFF_ATTEMPTS = 6
HANDOFF_PAUSE_S = 0.1


async def _open(handle: DeploymentHandle, prompt, params) -> tuple:
    """One job's stream and its first delta (or the exception it raised)."""
    stream, attempt = None, 0
    try:
        while True:  # ends: the last attempt is never handed off
            may_hand_off = attempt < HANDOFF_ATTEMPTS - 1
            stream = handle.options(stream=True).generate.remote(prompt, params, may_hand_off)
            first = await _first(stream)
            if not first.get("handed_off"):
                return stream, first
            await asyncio.sleep(HANDOFF_PAUSE_S * 2 ** attempt)
            attempt += 1
    except Exception as exc:  # BackPressureError comes at submission rather than on the first item
        return stream, exc


async def _submit(handle: DeploymentHandle, jobs: list) -> tuple[list, list]:
    """Streams of `jobs` and their first deltas (or the exceptions they raised)."""
    opened = await asyncio.gather(*(_open(handle, prompt, params) for prompt, params in jobs))
    return [stream for stream, _ in opened], [first for _, first in opened]


def _cancel(stream: DeploymentResponseGenerator | None) -> None:
    """Cancel an engine request; cancelling one that already failed re-raises its error: ignore that."""
    try:
        if stream is not None:
            stream.cancel()
    except Exception:
        pass


def _engine_fault(exc: Exception) -> APIError:
    """A replica's failure as a 500: the engine's own message (a request's fault, RequestFailed, or the
    engine's), without the remote traceback Ray wraps it in."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    return APIError(500, f"generation failed: {cause}", "server_error")


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, models: dict[str, DeploymentHandle], config: ServeConfig):
        step_back(niceness=config.ingress.niceness)  # forwarding HTTP must not take cores from an engine beside it
        self.models = models
        self.limits = config.limits
        self.retry_after_s = config.ingress.retry_after_s
        # the controller's routes need the admin key too; /admin/engine still answers only with admin_routes
        self.engine_admin, self.controller_prefix = config.auth.admin_routes, config.auth.controller_routes
        self.guard = GuardSettings(
            max_body_bytes=config.limits.max_body_bytes, api_keys=load_api_keys(config.auth.api_keys_file),
            admin_key=load_admin_key() if self.engine_admin or self.controller_prefix else None,
            docs=config.ingress.docs, max_in_flight=config.ingress_max_in_flight(),
            log_prompts=config.ingress.log_prompts, retry_after_s=config.ingress.retry_after_s)
        app.state.guard = self.guard
        self.shutdown = asyncio.Event()  # set when shutdown's grace period is over
        self._cards: dict[str, tuple[float, dict]] = {}  # model -> (monotonic time read, card)
        self.mirror = Mirror()  # finished requests to the live profiler, when one runs (deployments/mirror.py)

    @app.get("/health", responses={503: {"description": "shutting down"}})
    async def health(self):
        if self.guard.draining:
            return JSONResponse({"status": "shutting down", "models": sorted(self.models)}, 503)
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/admin/engine", include_in_schema=False)
    async def engine_states(self) -> dict:
        """What each model's engine holds now (one replica per model answers); the guard checks the admin key."""
        if not self.engine_admin:
            raise APIError(404, "not found", "not_found_error")
        states = await asyncio.gather(*(handle.engine_state.remote() for handle in self.models.values()))
        return dict(zip(self.models, states))

    @app.get("/{prefix:path}/controller", include_in_schema=False)
    async def controller_state(self, prefix: str, request: Request, limit: int = Query(100, ge=1, le=10_000)):
        """The HELIOS controller's state and performance history, newest last (auth.controller_routes).

        Checked here as well as by the guard: the prefix need not be under /admin."""
        if self.controller_prefix != "/" + prefix:
            raise APIError(404, "not found", "not_found_error")
        if not key_accepted(bearer_token(request.scope["headers"]), frozenset([self.guard.admin_key])):
            raise APIError(401, "the admin routes need the admin key as a bearer token", code="invalid_api_key")
        try:
            return await controller_view(limit)
        except NoController as exc:
            raise APIError(503, str(exc), "server_error", "no_controller") from None

    async def drain(self, grace_s: float) -> dict:
        """Shutdown: refuse new requests, give in-flight ones `grace_s` to finish, then end the rest
        with an error (streams: an error event, then [DONE]). Returns how many were cut."""
        self.guard.draining = True
        try:
            await asyncio.wait_for(self.guard.idle.wait(), grace_s)
            return {"cut": 0}
        except asyncio.TimeoutError:
            cut = self.guard.in_flight
            self.shutdown.set()
            try:  # the cut requests now answer at once; wait for their last bytes to leave
                await asyncio.wait_for(self.guard.idle.wait(), 5)
            except asyncio.TimeoutError:
                pass
            return {"cut": cut}

    @app.get("/v1/models", responses=_ERRORS)
    async def list_models(self) -> dict:
        # cards are kept for CARD_TTL_S only: the controller may redeploy a model at another depth or
        # candidate, and a card read during the surge may come from the replica being replaced
        now = time.monotonic()
        stale = [m for m in self.models if now - self._cards.get(m, (-CARD_TTL_S, None))[0] >= CARD_TTL_S]
        cards = await asyncio.gather(*(self.models[m].model_card.remote() for m in stale))
        self._cards.update((m, (now, card)) for m, card in zip(stale, cards))
        return {"object": "list", "data": [self._cards[m][1] for m in self.models]}

    @app.post("/v1/completions", responses=_GENERATION)
    async def completions(self, body: CompletionRequest):
        return await self._serve(body, body.prompts(), chat=False, want_logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions", responses=_GENERATION)
    async def chat_completions(self, body: ChatCompletionRequest):
        try:
            conversation = body.conversation()
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return await self._serve(body, [conversation], chat=True, want_logprobs=body.logprobs)

    # ---- one request: n x prompts engine requests -------------------------------------

    async def _serve(self, body, prompts: list, chat: bool, want_logprobs: bool):
        handle = self.models.get(body.model)
        if handle is None:
            raise APIError(400, f"model {body.model!r} is not served here; GET /v1/models lists the models",
                           code="model_not_found")
        try:
            check_limits(body, self.limits)
            params = [body.params(i) for i in range(body.n)]
            if self.limits.max_tokens is not None:  # the cap also bounds chat's "until the context is full"
                params = [replace(p, max_tokens=min(p.max_tokens, self.limits.max_tokens)) for p in params]
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        jobs = [(prompt, p) for prompt in prompts for p in params]
        streams, firsts = await self._start(handle, jobs)
        states = [ChoiceState(i, chat, want_logprobs, body.return_exit_layers, body.return_predicted_length) for i in range(len(jobs))]
        builder = ResponseBuilder(body.model, chat)
        if body.stream:
            events = self._events(streams, firsts, states, builder, body.n, body.include_usage, jobs)
            return StreamingResponse(events, media_type="text/event-stream")
        for stream, first, state in zip(streams, firsts, states):
            state.add(first)
        try:
            await self._unless_shutdown(
                asyncio.gather(*(self._drain(s, st) for s, st in zip(streams, states) if not st.finish_reason)))
        except (asyncio.CancelledError, ShuttingDown) as exc:  # the client went away, or shutdown: free the engine
            for stream in streams:
                _cancel(stream)
            if isinstance(exc, ShuttingDown):
                raise APIError(503, "the server shut down before this request finished", "server_error",
                               "shutting_down") from None
            raise
        except Exception as exc:  # an engine fault in one choice: the others stop, the client gets a 500
            for stream in streams:
                _cancel(stream)
            raise _engine_fault(exc) from None
        response = builder.envelope([s.full() for s in states], chunk=False)
        response["usage"] = builder.usage(states, body.n)
        self.mirror.offer(jobs, states)  # fire-and-forget, sampled; the response is already built
        return response

    async def _start(self, handle: DeploymentHandle, jobs: list) -> tuple[list, list[dict]]:
        """Submit every job and wait for its first delta, so a bad request or a full queue fails before the 200.

        A max_tokens that does not fit the context after the prompt (known once the replica has
        tokenized it) is refused there, unless the request truncates (`strict_max_tokens` off):
        then generation stops when the context is full."""
        streams, results = await _submit(handle, jobs)
        failure = next((r for r in results if isinstance(r, BaseException) or "error" in r), None)
        if failure is None:
            return streams, results
        for stream in streams:
            _cancel(stream)
        if isinstance(failure, BackPressureError):
            raise APIError(503, "the model's request queue is full; retry later", "server_error",
                           "queue_full", headers={"Retry-After": str(self.retry_after_s)})
        if isinstance(failure, Exception):  # an engine fault: OpenAI's 500 body, not Starlette's text
            raise _engine_fault(failure) from None
        if isinstance(failure, BaseException):
            raise failure
        raise APIError(400, failure["error"])

    async def _unless_shutdown(self, work):
        """Await `work`; raise ShuttingDown (cancelling it) if shutdown's grace period ends first."""
        work = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.shutdown.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
                # its streams may end with Serve's RequestCancelledError, not CancelledError: read it,
                # or asyncio logs "exception was never retrieved" for every client that went away
                work.add_done_callback(lambda future: future.cancelled() or future.exception())
        if work in done:
            return work.result()
        raise ShuttingDown

    @staticmethod
    async def _drain(stream: DeploymentResponseGenerator, state: ChoiceState) -> None:
        async for delta in stream:
            state.add(delta)

    async def _events(self, streams, firsts, states, builder: ResponseBuilder, n: int,
                      include_usage: bool, jobs: list) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta of any choice, then usage if asked, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                queue.put_nowait((index, firsts[index]))
                if not firsts[index]["finished"]:
                    async for delta in streams[index]:
                        queue.put_nowait((index, delta))
            except Exception as exc:  # an engine fault ends this choice with an error event
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, None))

        pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        open_streams = len(streams)
        try:
            while open_streams:
                try:
                    index, item = await self._unless_shutdown(queue.get())
                except ShuttingDown:
                    yield sse_event(error_body("the server shut down before this request finished", "server_error",
                                               "shutting_down"))
                    break
                if item is None:
                    open_streams -= 1
                elif isinstance(item, Exception):
                    yield sse_event(error_body(_engine_fault(item).message, "server_error"))
                else:
                    states[index].add(item)
                    yield sse_event(builder.envelope([states[index].chunk(item)], chunk=True))
            self.mirror.offer(jobs, states)  # fire-and-forget; only finished choices are mirrored
            if include_usage and not self.shutdown.is_set():
                yield sse_event({**builder.envelope([], chunk=True), "usage": builder.usage(states, n)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop every engine request
            for stream, task in zip(streams, pumps):
                _cancel(stream)
                task.cancel()
