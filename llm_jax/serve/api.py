"""The OpenAI-compatible HTTP server of --mode=serve: routes, validation, errors, streaming.

Built on FastAPI (Starlette) + uvicorn, the stack vLLM's and Levanter's OpenAI servers use:
pydantic validates request bodies field by field, Starlette streams server-sent events and
notices a client that goes away, uvicorn drains in-flight requests on SIGTERM. The decoding
itself is the engine's (engine.py); this module turns requests into engine sequences and the
engine's events into OpenAI's JSON.

Routes: POST /v1/completions, POST /v1/chat/completions (chat.py renders the template), GET
/v1/models, /health, /metrics (Prometheus text), / (the playground page). Every error is
OpenAI's shape {"error": {"message", "type", "param", "code"}} with 400 (bad request), 401 (no
or wrong API key), 404 (unknown model or route), 413 (body too large), 429 (queue full, with
Retry-After) or 500 (a bug in one request: logged, the others go on).

Mapped honestly or refused: `presence_penalty` / `frequency_penalty` other than 0 are refused
(400): they are additive OpenAI penalties, not Hugging Face's multiplicative
`repetition_penalty`, which is offered instead. `echo` and `best_of` > n are refused too.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any, List, Literal, Optional, Union

import fastapi
import prometheus_client as prom
import pydantic
import uvicorn
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from llm_jax import chat
from llm_jax.serve import engine as engine_lib

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
API_KEY_ENV = "LLM_JAX_SERVE_API_KEY"


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None, type_: str = "invalid_request_error", headers=None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type, self.headers = type_, headers


def error_json(status, message, type_="invalid_request_error", param=None, code=None,
               headers=None):
  return responses.JSONResponse(
      {"error": {"message": message, "type": type_, "param": param, "code": code}},
      status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------
# Request bodies. Strict types: "16" is not a number; unknown fields are ignored, as OpenAI does.


class _Body(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
  include_usage: bool = False


class _Sampling(_Body):
  model: Optional[str] = None
  temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  n: int = pydantic.Field(1, ge=1)
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  stop: Union[str, List[str], None] = None
  seed: Optional[int] = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  user: Optional[str] = None
  # Our extensions, as vLLM names them.
  top_k: int = pydantic.Field(0, ge=-1)
  repetition_penalty: float = pydantic.Field(1.0, gt=0.0)
  min_tokens: int = pydantic.Field(0, ge=0)
  return_token_ids: bool = False


class CompletionRequest(_Sampling):
  prompt: Union[str, List[str], List[int], List[List[int]]]
  max_tokens: Optional[int] = pydantic.Field(16, ge=1)
  logprobs: Optional[int] = pydantic.Field(None, ge=0, le=5)
  echo: bool = False
  best_of: Optional[int] = None


class ContentPart(_Body):
  type: Literal["text"]
  text: str


class Message(_Body):
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: Union[str, List[ContentPart], None] = None


class ChatRequest(_Sampling):
  messages: List[Message]
  max_tokens: Optional[int] = pydantic.Field(None, ge=1)
  max_completion_tokens: Optional[int] = pydantic.Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: Optional[int] = pydantic.Field(None, ge=0, le=engine_lib.TOP_LOGPROBS)


# ----------------------------------------------------------------------------------------------


class Metrics:
  """The server's Prometheus series, in a registry of its own."""

  def __init__(self):
    self.registry = r = prom.CollectorRegistry()
    self.requests = prom.Counter("llm_jax_serve_requests", "HTTP requests by route and status",
                                 ["route", "status"], registry=r)
    self.prompt_tokens = prom.Counter("llm_jax_serve_prompt_tokens", "Prompt tokens read",
                                      registry=r)
    self.generation_tokens = prom.Counter("llm_jax_serve_generation_tokens",
                                          "Tokens generated", registry=r)
    self.queue_depth = prom.Gauge("llm_jax_serve_queue_depth", "Sequences waiting for a slot",
                                  registry=r)
    self.running = prom.Gauge("llm_jax_serve_running_slots", "Decode slots in use", registry=r)
    buckets = (.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
    self.ttft = prom.Histogram("llm_jax_serve_time_to_first_token_seconds",
                               "From queued to first token", buckets=buckets, registry=r)
    self.itl = prom.Histogram("llm_jax_serve_inter_token_latency_seconds",
                              "Between consecutive tokens of a sequence", buckets=buckets,
                              registry=r)
    self.compiles = prom.Gauge("llm_jax_serve_jit_compiles",
                               "Jit traces in this process (constant after warm-up)", registry=r)
    self.compiles.set_function(engine_lib.compiles)


class Server:
  """What the routes share: the engine, the tokenizer, the limits."""

  def __init__(self, engine, tokenizer, *, model_name: str, max_tokens: int, max_n: int,
               max_body_bytes: int, api_key: Optional[str], chat_template=None, metrics=None):
    self.engine, self.tok, self.model_name = engine, tokenizer, model_name
    self.max_tokens, self.max_n, self.max_body = max_tokens, max_n, max_body_bytes
    self.api_key, self.chat_template = api_key, chat_template
    # A chat reply also ends at the template's end-of-turn token (a plain completion at EOS).
    self.chat_end_ids = tuple(chat.end_of_turn_ids(tokenizer, chat_template)) if (
        chat_template) else ()
    self.metrics = metrics or Metrics()
    self.created = int(time.time())

  # -- validation shared by both routes

  def check_model(self, name):
    if name is not None and name != self.model_name:
      raise ApiError(404, f"The model `{name}` does not exist: this server serves "
                     f"`{self.model_name}` (GET /v1/models)", "model", "model_not_found")

  def params(self, req, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int]):
    """engine.Params for one prompt, after checking the request against the context and limits."""
    if req.presence_penalty or req.frequency_penalty:
      raise ApiError(400, "presence_penalty and frequency_penalty are not supported (they are "
                     "additive OpenAI penalties): use repetition_penalty (Hugging Face's, > 1 "
                     "discourages repeats)", "presence_penalty")
    if req.n > self.max_n:
      raise ApiError(400, f"n={req.n} is over this server's limit of {self.max_n} "
                     f"(serve_max_n)", "n")
    context = self.engine.context
    left = context - prompt_len
    if left < 1:
      raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                     f"prompt is {prompt_len} tokens, which leaves no room for a completion",
                     "prompt", "context_length_exceeded")
    if max_tokens is None:
      max_tokens = min(left, self.max_tokens)
    if max_tokens > self.max_tokens:
      raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of "
                     f"{self.max_tokens} (serve_max_tokens)", "max_tokens")
    if max_tokens > left:
      raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                     f"prompt is {prompt_len} tokens, so max_tokens may be at most {left} "
                     f"(asked {max_tokens})", "max_tokens", "context_length_exceeded")
    if req.min_tokens > max_tokens:
      raise ApiError(400, f"min_tokens={req.min_tokens} is over max_tokens={max_tokens}",
                     "min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    return engine_lib.Params(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=max(req.top_k, 0), repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens, stop=tuple(stop), seed=req.seed, logprobs=logprobs)

  def encode(self, text: str) -> list:
    # An empty prompt starts a fresh document, as in --mode=sample.
    return self.tok.encode(text, add_bos=self.tok.add_bos) or [self.tok.eos_id]

  def check_ids(self, ids):
    vocab = self.engine.model_cfg.vocab_size
    if not ids:
      raise ApiError(400, "a prompt of token ids is empty", "prompt")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
      raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                     "prompt")
    return list(ids)


async def _run(server: Server, request: fastapi.Request, prompts, params_list, n, stream,
               include_usage, every_token, render):
  """Submits n sequences per prompt and answers: a stream of SSE chunks or one JSON body.
  render(kind, ...) builds the route's chunk and body shapes; every_token: send a chunk for
  each token (logprobs or token ids asked), not only when text arrives."""
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()
  seqs = []
  for pi, (ids, params) in enumerate(zip(prompts, params_list)):
    for j in range(n):
      index = pi * n + j

      def emit(ev, index=index):
        try:
          loop.call_soon_threadsafe(events.put_nowait, (index, ev))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
          pass
      p = engine_lib.Params(**{**params.__dict__, "sample_index": j})
      seqs.append(engine_lib.Sequence(prompt=ids, params=p, emit=emit))
  try:
    server.engine.submit(seqs)
  except engine_lib.QueueFull as e:
    raise ApiError(429, f"The server is busy: {e}. Retry shortly.", type_="rate_limit_error",
                   code="queue_full", headers={"Retry-After": "1"}) from None
  server.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
  prompt_tokens = sum(len(p) for p in prompts)
  rid = render("id")

  async def next_event():
    return await events.get()

  if stream:
    async def sse():
      done, failed = 0, None
      try:
        for index in range(len(seqs)):  # chat's first delta of each choice names the role
          first = render("start", rid, index)
          if first is not None:
            yield "data: " + json.dumps(first) + "\n\n"
        while done < len(seqs):
          index, ev = await next_event()
          if ev[0] == "delta":
            _, text, tok, entry = ev
            if text or every_token:
              yield "data: " + json.dumps(render("chunk", rid, index, text, tok, entry, None)) + "\n\n"
          elif ev[0] == "done":
            done += 1
            yield "data: " + json.dumps(render("chunk", rid, index, "", None, None, ev[1])) + "\n\n"
          else:
            done += 1
            failed = ev[1]
        if failed:
          logging.error("request %s failed: %s", rid, failed)
          yield "data: " + json.dumps({"error": {"message": failed, "type": "internal_error",
                                                 "param": None, "code": None}}) + "\n\n"
        elif include_usage:
          gen = sum(len(s.tokens) for s in seqs)
          yield "data: " + json.dumps(render("usage", rid, _usage(prompt_tokens, gen))) + "\n\n"
        yield "data: [DONE]\n\n"
      finally:  # normal end, or the client went away (Starlette cancels the response)
        server.engine.cancel([s for s in seqs if s.finish_reason is None])

    return responses.StreamingResponse(sse(), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache"})

  done, failed = 0, None
  try:
    while done < len(seqs):
      try:
        _, ev = await asyncio.wait_for(next_event(), timeout=0.5)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          return responses.Response(status_code=499)
        continue
      if ev[0] == "done":
        done += 1
      elif ev[0] == "error":
        done += 1
        failed = ev[1]
  finally:
    server.engine.cancel([s for s in seqs if s.finish_reason is None])
  if failed:
    raise ApiError(500, failed, type_="internal_error")
  gen = sum(len(s.tokens) for s in seqs)
  return responses.JSONResponse(render("body", rid, seqs, _usage(prompt_tokens, gen)))


def _usage(prompt_tokens, completion_tokens):
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(tok, entries, text_start=0):
  """OpenAI completions' logprobs object for [(token, logprob, [(id, logprob)])]."""
  tokens, token_lps, tops, offsets, at = [], [], [], [], text_start
  for tok_id, lp, top in entries:
    t = engine_lib.token_text(tok, tok_id)
    tokens.append(t)
    token_lps.append(lp)
    tops.append({engine_lib.token_text(tok, i): v for i, v in top})
    offsets.append(at)
    at += len(t)
  return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
          "text_offset": offsets}


def _chat_logprobs(tok, entries):
  def one(tok_id, lp):
    t = engine_lib.token_text(tok, tok_id)
    return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
  return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]}
                      for t, lp, top in entries]}


def build_app(server: Server) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="llm_jax", docs_url=None, redoc_url=None, openapi_url=None)
  tok = server.tok

  @app.exception_handler(ApiError)
  async def _api_error(_request, e: ApiError):
    return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _invalid(_request, e):
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
      return error_json(400, f"The body is not valid JSON: {err.get('msg')}")
    where = ".".join(loc) or "body"
    return error_json(400, f"Invalid value for '{where}': {err.get('msg')}", param=where or None)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http(_request, e):
    return error_json(e.status_code, str(e.detail), type_="invalid_request_error")

  @app.exception_handler(Exception)
  async def _bug(request, e):
    logging.exception("request %s %s failed", request.method, request.url.path)
    return error_json(500, f"internal error ({type(e).__name__}): logged by the server",
                      type_="internal_error")

  @app.middleware("http")
  async def _guard(request: fastapi.Request, call_next):
    route = request.url.path
    try:
      if request.method == "POST":
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > server.max_body:
          raise ApiError(413, f"The body is {size} bytes, over this server's limit of "
                         f"{server.max_body} (serve_max_body_bytes)")
        if len(await request.body()) > server.max_body:
          raise ApiError(413, f"The body is over this server's limit of {server.max_body} "
                         f"bytes (serve_max_body_bytes)")
      if server.api_key and route.startswith("/v1"):
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {server.api_key}".encode()):
          raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                         type_="authentication_error", code="invalid_api_key")
      response = await call_next(request)
    except ApiError as e:
      response = error_json(e.status, e.message, e.type, e.param, e.code, e.headers)
    server.metrics.requests.labels(route if route in _ROUTES else "other",
                                   str(response.status_code)).inc()
    return response

  @app.get("/health")
  async def health():
    return {"status": "ok", "running": server.engine.running(),
            "waiting": server.engine.queue_depth()}

  @app.get("/metrics")
  async def metrics():
    return responses.Response(prom.generate_latest(server.metrics.registry),
                              media_type=prom.CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                        "created": server.created, "owned_by": "llm_jax",
                                        "max_model_len": server.engine.context}]}

  @app.get("/")
  async def page():
    return responses.FileResponse(PAGE, media_type="text/html")

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: fastapi.Request):
    server.check_model(req.model)
    if req.echo:
      raise ApiError(400, "echo is not supported", "echo")
    if req.best_of is not None and req.best_of != req.n:
      raise ApiError(400, "best_of other than n is not supported", "best_of")
    raw = req.prompt
    if isinstance(raw, str):
      prompts = [server.encode(raw)]
    elif raw and all(isinstance(x, int) for x in raw):
      prompts = [server.check_ids(raw)]
    elif raw and all(isinstance(x, str) for x in raw):
      prompts = [server.encode(x) for x in raw]
    elif raw and all(isinstance(x, list) for x in raw):
      prompts = [server.check_ids(x) for x in raw]
    else:
      raise ApiError(400, "prompt is empty: give a string, a list of strings or of token ids",
                     "prompt")
    params = [server.params(req, len(p), req.max_tokens, req.logprobs) for p in prompts]
    created = int(time.time())

    def render(kind, *a):
      if kind == "id":
        return f"cmpl-{uuid.uuid4().hex}"
      if kind == "start":
        return None
      if kind == "chunk":
        rid, index, text, tok_id, entry, finish = a
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if entry is not None:
          choice["logprobs"] = _completion_logprobs(tok, [entry])
        if req.return_token_ids and tok_id is not None:
          choice["token_ids"] = [tok_id]
        return {"id": rid, "object": "text_completion", "created": created,
                "model": server.model_name, "choices": [choice]}
      if kind == "usage":
        rid, usage = a
        return {"id": rid, "object": "text_completion", "created": created,
                "model": server.model_name, "choices": [], "usage": usage}
      rid, seqs, usage = a
      choices = []
      for i, s in enumerate(seqs):
        c = {"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
        if req.logprobs is not None:
          c["logprobs"] = _completion_logprobs(tok, s.entries)
        if req.return_token_ids:
          c["token_ids"] = s.tokens
        choices.append(c)
      return {"id": rid, "object": "text_completion", "created": created,
              "model": server.model_name, "choices": choices, "usage": usage}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await _run(server, request, prompts, params, req.n, req.stream, include_usage,
                      req.logprobs is not None or req.return_token_ids, render)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: fastapi.Request):
    server.check_model(req.model)
    if server.chat_template is None:
      raise ApiError(400, "This model has no chat template (its tokenizer_config.json names "
                     "none): use /v1/completions with a plain prompt", "messages",
                     "no_chat_template")
    if not req.messages:
      raise ApiError(400, "messages is empty: give at least one message", "messages")
    if req.top_logprobs is not None and not req.logprobs:
      raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
      raise ApiError(400, "give max_completion_tokens or max_tokens, not both",
                     "max_completion_tokens")
    messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
    try:
      text = chat.render(server.chat_template, messages, tok)
    except chat.TemplateError as e:
      raise ApiError(400, str(e), "messages") from None
    ids = tok.encode(text) or [tok.eos_id]  # the template writes its own BOS
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = dataclasses.replace(
        server.params(req, len(ids), req.max_completion_tokens or req.max_tokens, logprobs),
        end_ids=server.chat_end_ids)
    created = int(time.time())

    def frame(rid, choices, **extra):
      return {"id": rid, "object": "chat.completion.chunk", "created": created,
              "model": server.model_name, "choices": choices, **extra}

    def render(kind, *a):
      if kind == "id":
        return f"chatcmpl-{uuid.uuid4().hex}"
      if kind == "start":
        rid, index = a
        return frame(rid, [{"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])
      if kind == "chunk":
        rid, index, text, tok_id, entry, finish = a
        choice = {"index": index, "delta": {"content": text} if text or not finish else {},
                  "logprobs": None if entry is None else _chat_logprobs(tok, [entry]),
                  "finish_reason": finish}
        if req.return_token_ids and tok_id is not None:
          choice["token_ids"] = [tok_id]
        return frame(rid, [choice])
      if kind == "usage":
        rid, usage = a
        return frame(rid, [], usage=usage)
      rid, seqs, usage = a
      choices = []
      for i, s in enumerate(seqs):
        c = {"index": i, "message": {"role": "assistant", "content": s.text},
             "logprobs": _chat_logprobs(tok, s.entries) if req.logprobs else None,
             "finish_reason": s.finish_reason}
        if req.return_token_ids:
          c["token_ids"] = s.tokens
        choices.append(c)
      return {"id": rid, "object": "chat.completion", "created": created,
              "model": server.model_name, "choices": choices, "usage": usage}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await _run(server, request, [ids], [params], req.n, req.stream, include_usage,
                      req.logprobs or req.return_token_ids, render)

  app.state.server = server
  return app


def _text_of(content) -> str:
  """A message's text: a string, or its text parts joined."""
  if content is None:
    return ""
  return content if isinstance(content, str) else "".join(p.text for p in content)


_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def serve(server: Server, host: str, port: int) -> int:
  """Runs the server until SIGTERM / SIGINT; in-flight requests finish first. Returns 0."""
  app = build_app(server)
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=600, lifespan="off")
  web = uvicorn.Server(config)
  # uvicorn re-raises the signal it caught once it has drained: answer it with a no-op handler,
  # so the process ends by returning (exit 0) rather than by the signal's default action.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  server.engine.start()
  print(f"serving {server.model_name} on http://{host}:{port} (OpenAI API at /v1, playground "
        f"at /)", flush=True)
  try:
    web.run()
  finally:
    server.engine.stop()
  print("server stopped: every request in flight finished", flush=True)
  return 0


def check_address(host: str, port: int) -> None:
  """UserError unless (host, port) can be bound: found before the minutes of loading and
  compiling, not after (the port is bound for real once the engine is ready)."""
  from llm_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise errors.UserError(f"serve_host={host!r} is not an address of this machine ({e}): use "
                           f"127.0.0.1, 0.0.0.0 or a name that resolves here") from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
      s.bind(address)
    except OSError as e:
      raise errors.UserError(f"cannot listen on {host}:{port} ({e.strerror}): another server "
                             f"holds it? choose another --config.serve_port") from None


def run(cfg, workdir: str, overrides=()) -> int:
  """--mode=serve: load the model (loader.py), compile the engine, serve until SIGTERM."""
  from llm_jax import loader  # pylint: disable=g-import-not-at-top
  from llm_jax import sampling  # pylint: disable=g-import-not-at-top
  check_address(cfg.serve_host, cfg.serve_port)
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=overrides)
  context = sampling.max_new_tokens_for(0, loaded.model_cfg, loaded.cfg.max_seq_len)
  server_metrics = Metrics()
  template = chat.template_of_run(loaded, cfg.chat_template, required=False)
  eng = engine_lib.Engine(loaded.params, loaded.model_cfg, loaded.tokenizer,
                          slots=cfg.serve_slots, context=context,
                          max_queue=cfg.serve_max_queue, metrics=server_metrics)
  if loaded.quantization:
    print(f"# {loaded.quantization}", flush=True)
  print(f"# checkpoint {loaded.step} from {workdir}: {cfg.serve_slots} slots over a context of "
        f"{context} tokens; compiling prompt buckets {eng.buckets} and the decode step",
        flush=True)
  t0 = time.monotonic()
  eng.warmup()
  print(f"# compiled in {time.monotonic() - t0:.1f} s", flush=True)
  server = Server(eng, loaded.tokenizer,
                  model_name=cfg.serve_model_name or os.path.basename(os.path.abspath(workdir)),
                  max_tokens=min(cfg.serve_max_tokens or context, context),
                  max_n=cfg.serve_max_n, max_body_bytes=cfg.serve_max_body_bytes,
                  api_key=cfg.serve_api_key or os.environ.get(API_KEY_ENV) or None,
                  chat_template=template,
                  metrics=server_metrics)
  return serve(server, cfg.serve_host, cfg.serve_port)
