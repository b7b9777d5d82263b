"""An OpenAI-compatible server for any sajax model (`sajax-serve`): `/v1/models`, `/v1/chat/completions`,
`/v1/completions`, `/v1/embeddings`, on FastAPI + uvicorn.

Requests are batched: a worker thread takes the first queued request, collects more for up to `max_wait_ms` or
until `max_batch` rows, and runs them as one jitted prefill + decode (`sajax.infer.generate`) — every row with its own
temperature, top_p and seed (a row's draws depend on its seed alone), the batch padded to a power of two rows and
its token budget to a power of two (few shapes, few compiles). A full queue answers 429 (clients retry); a bad
request 400 with the field named, an unknown model 404, in OpenAI's error format.

Chat: the model's chat template renders the messages (a model without one gets the HH-RLHF "Human: / Assistant:"
text, `sajax.infer.lm`); a conversation that ends with an assistant message is continued from it (prefill: its
text starts the reply, as vLLM's `continue_final_message`). `logprobs` / `top_logprobs` (≤ 20) are the model's
log-probabilities (log_softmax of the logits, before temperature and top_p). `stop` strings cut the text after
decoding. Embeddings: the mean of the final hidden states over the input's tokens, L2-normalised.
Not supported, refused with 400: streaming, `response_format` other than text, tools.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import queue
import secrets
import threading
import time
from typing import Literal

import numpy as np
import pydantic

from sajax.formats import tokenizer as tokenizer_lib
from sajax.infer import generate, lm

MAX_TOP_LOGPROBS = 20
MIN_TOKEN_BUDGET = 16


class RequestError(ValueError):
    """A request the server refuses: `status` (400, 404, 429) and the field at fault (`param`)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclasses.dataclass
class Job:
    """One row of generation: a prompt's token ids and how to continue it."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int | None = None  # None: no logprobs
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]  # the generated tokens, up to and including the end (or the stop string)
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"
    pieces: list[str]  # the text's tokens' texts (the end-of-sequence token is not among them)
    logprobs: list[float] | None = None
    top: list[list[tuple[str, float]]] | None = None  # per token: the most likely tokens' text and log p


def _power_of_two(n: int, least: int = 1) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


class Engine:
    """The model behind the server: a bounded queue of jobs and one worker thread that runs them in batches."""

    def __init__(self, model: lm.LanguageModel, name: str, *, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        self.model, self.name = model, name
        self.config, self.params, self.tokenizer = model.config, model.params, model.tokenizer
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.stop_ids = generate.stop_token_ids(self.config, self.tokenizer)
        self.queue: queue.Queue = queue.Queue(max_queue) if max_queue > 0 else None
        self.batches: list[int] = []  # rows of every batch run (for tests and the bench)
        self._worker = threading.Thread(target=self._loop, daemon=True, name="sajax-serve-engine")
        if self.queue is not None:  # max_queue 0: no queue, every request is refused (429)
            self._worker.start()

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def submit(self, kind: str, payload) -> concurrent.futures.Future:
        """Queues a job ("generate": a Job; "embed": a list of token lists); RequestError 429 when the queue is
        full."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            if self.queue is None:
                raise queue.Full
            self.queue.put_nowait((kind, payload, future))
        except queue.Full:
            raise RequestError("the server's queue is full; retry later", status=429) from None
        return future

    def close(self) -> None:
        if self._worker.is_alive():
            self.queue.put(None)
            self._worker.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
            jobs = [item for item in batch if item[0] == "generate"]
            for kind, payload, future in batch:
                if kind == "embed":
                    self._settle([future], lambda payload=payload: [self.embed(payload)])
            if jobs:
                self._settle([f for _, _, f in jobs], lambda: self.generate([j for _, j, _ in jobs]))

    @staticmethod
    def _settle(futures, run) -> None:
        try:
            results = run()
        except Exception as e:  # the requests of a failed batch get its error; the server goes on
            for future in futures:
                future.set_exception(e)
            return
        for future, result in zip(futures, results):
            future.set_result(result)

    def embed(self, sequences: list[list[int]]) -> np.ndarray:
        vectors = generate.mean_hidden_states(self.config, self.params, sequences)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)

    def generate(self, jobs: list[Job]) -> list[Completion]:
        """One batched prefill + decode for `jobs` (each already checked to fit the context)."""
        rows = jobs + [jobs[0]] * (_power_of_two(len(jobs)) - len(jobs))  # padded with copies, dropped below
        longest = max(len(j.prompt) for j in rows)
        budget = min(_power_of_two(max(j.max_tokens for j in rows), MIN_TOKEN_BUDGET), self.context_length - longest)
        if budget < max(j.max_tokens for j in rows) and len(jobs) > 1:  # a long prompt leaves another row short
            return [self.generate([job])[0] for job in jobs]  # each fits alone (checked before it was queued)
        self.batches.append(len(jobs))
        asked = [j.top_logprobs for j in rows if j.top_logprobs is not None]
        state = generate.prefill(self.config, self.params, [j.prompt for j in rows], reserve=budget)
        out = generate.decode(self.config, self.params, state, max_new_tokens=budget,
                              temperature=[j.temperature for j in rows], top_p=[j.top_p for j in rows],
                              seed=[j.seed % 2**32 for j in rows], eos_token_id=self.stop_ids,
                              pad_token_id=self.tokenizer.pad_token_id,
                              top_logprobs=MAX_TOP_LOGPROBS if asked else None)
        return [self._completion(job, out, row) for row, job in enumerate(jobs)]

    def _completion(self, job: Job, out: generate.Generation, row: int) -> Completion:
        """Row `row` of `out` cut at the job's own max_tokens, at its end of sequence, or before its first stop
        string (the tokens then run up to the one that completes the stop string)."""
        n = min(int(out.lengths[row]), job.max_tokens)
        tokens = [int(t) for t in out.tokens[row, :n]]
        finish = "stop" if tokens and tokens[-1] in self.stop_ids else "length"
        shown = tokens[:-1] if finish == "stop" else tokens  # the text's tokens: not the end of sequence / turn
        pieces = [self.tokenizer.decode([t], skip_special_tokens=True) for t in shown]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        joined = "".join(pieces)
        found = min(((joined.find(s), s) for s in job.stop if s and s in joined), default=None)
        if found is not None:
            end, kept = found[0] + len(found[1]), 0
            while kept < len(pieces) and sum(map(len, pieces[:kept])) < end:
                kept += 1
            tokens, pieces, finish, text = tokens[:kept], pieces[:kept], "stop", joined[:found[0]]
        completion = Completion(text, tokens, finish, pieces)
        if job.top_logprobs is not None:
            completion.logprobs = [float(x) for x in out.logprobs[row, :len(pieces)]]
            completion.top = [[(self.tokenizer.decode([int(t)]), float(v))
                               for t, v in zip(out.top_ids[row, i, :job.top_logprobs],
                                               out.top_logprobs[row, i, :job.top_logprobs])]
                              for i in range(len(pieces))]
        return completion

# ---- the OpenAI request bodies (fields OpenAI's API has; others are ignored, as OpenAI's server does) ----

class Message(pydantic.BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages: only text content parts are supported, got type {part.get('type')!r}",
                                   param="messages")
            parts.append(part["text"])
        return "".join(parts)


class Sampling(pydantic.BaseModel):
    model: str
    temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    n: int = pydantic.Field(1, ge=1, le=64)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    response_format: dict | None = None
    tools: list | None = None


class ChatRequest(Sampling):
    messages: list[Message] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = pydantic.Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = pydantic.Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class EmbeddingRequest(pydantic.BaseModel):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's default)


class Server:
    """Turns OpenAI requests into engine jobs and the results into OpenAI answers."""

    def __init__(self, engine: Engine, default_max_tokens: int = 256):
        self.engine, self.default_max_tokens = engine, default_max_tokens

    def _check_model(self, model: str) -> None:
        if model != self.engine.name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.engine.name!r}",
                               status=404, param="model")

    def _check_common(self, request: Sampling) -> None:
        self._check_model(request.model)
        if request.stream:
            raise RequestError("stream: streaming is not supported by sajax-serve", param="stream")
        if request.response_format and request.response_format.get("type") != "text":
            raise RequestError(f"response_format {request.response_format.get('type')!r} is not supported by "
                               "sajax-serve (no constrained decoding); read ratings from logprobs instead",
                               param="response_format")
        if request.tools:
            raise RequestError("tools are not supported by sajax-serve", param="tools")

    def _jobs(self, request: Sampling, prompt: list[int], max_tokens: int | None, top_logprobs: int | None
              ) -> list[Job]:
        limit = self.engine.context_length
        if len(prompt) >= limit:
            raise RequestError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}",
                               param="messages")
        max_tokens = max_tokens or min(self.default_max_tokens, limit - len(prompt))
        if len(prompt) + max_tokens > limit:
            raise RequestError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context of {limit} tokens", param="max_tokens")
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        seed = secrets.randbits(32) if request.seed is None else request.seed
        return [Job(prompt, max_tokens, request.temperature, request.top_p, seed + i, top_logprobs, stop)
                for i in range(request.n)]

    async def _run(self, jobs: list[Job]) -> list[Completion]:
        futures = [self.engine.submit("generate", job) for job in jobs]
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The token ids of the conversation up to where the reply starts; a final assistant message is the
        reply's beginning (prefill)."""
        turns = [("user" if m.role == "developer" else m.role, m.text()) for m in messages]
        prefill = turns.pop()[1] if turns[-1][0] == "assistant" else ""
        if not turns:
            raise RequestError("messages: a conversation needs a user turn", param="messages")
        model = self.engine.model
        if model.chat:
            return tokenizer_lib.encode_chat(self.engine.tokenizer, turns, assistant_prefix=prefill)
        system = "".join(f"{text}\n\n" for role, text in turns if role == "system")
        dialogue = [(role, text) for role, text in turns if role != "system"]
        try:
            lm.check_conversation(dialogue)
        except ValueError as e:
            raise RequestError(f"messages: {e}", param="messages") from e
        return self.engine.tokenizer.encode(system + lm.as_text(dialogue) + (" " + prefill if prefill else ""),
                                            add_special_tokens=True)

    async def chat(self, request: ChatRequest) -> dict:
        self._check_common(request)
        top = (request.top_logprobs or 0) if request.logprobs else None
        prompt = self.chat_prompt(request.messages)
        completions = await self._run(self._jobs(request, prompt, request.max_completion_tokens or request.max_tokens,
                                                 top))
        choices = []
        for i, c in enumerate(completions):
            choice = {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                      "logprobs": None}
            if top is not None:
                choice["logprobs"] = {"content": [
                    {"token": piece, "logprob": logp, "bytes": list(piece.encode()),
                     "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alternatives]}
                    for piece, logp, alternatives in zip(c.pieces, c.logprobs, c.top)]}
            choices.append(choice)
        return self._answer("chat.completion", choices, len(prompt), completions)

    async def complete(self, request: CompletionRequest) -> dict:
        self._check_common(request)
        if request.echo:
            raise RequestError("echo is not supported by sajax-serve", param="echo")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise RequestError("prompt: no prompt given", param="prompt")
        encoded = [self.engine.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        jobs = [job for ids in encoded for job in self._jobs(request, ids, request.max_tokens, request.logprobs)]
        completions = await self._run(jobs)
        choices = []
        for i, c in enumerate(completions):
            choice = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            if request.logprobs is not None:
                offsets = np.cumsum([0] + [len(p) for p in c.pieces[:-1]]).tolist() if c.pieces else []
                choice["logprobs"] = {"tokens": c.pieces, "token_logprobs": c.logprobs, "text_offset": offsets,
                                      "top_logprobs": [dict(alternatives) for alternatives in c.top]}
            choices.append(choice)
        return self._answer("text_completion", choices, sum(map(len, encoded)) * request.n, completions)

    async def embed(self, request: EmbeddingRequest) -> dict:
        self._check_model(request.model)
        inputs = request.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise RequestError("input: no input given", param="input")
        tok = self.engine.tokenizer
        sequences = [tok.encode(x, add_special_tokens=True) if isinstance(x, str) else list(x) for x in inputs]
        for i, ids in enumerate(sequences):
            if not ids or len(ids) > self.engine.context_length:
                raise RequestError(f"input {i}: {len(ids)} tokens; need 1 to {self.engine.context_length}",
                                   param="input")
            if not all(0 <= t < self.engine.config.vocab_size for t in ids):
                raise RequestError(f"input {i}: token ids outside the vocabulary", param="input")
        vectors = await asyncio.wrap_future(self.engine.submit("embed", sequences))
        return {"object": "list", "model": self.engine.name,
                "data": [{"object": "embedding", "index": i,
                          "embedding": v.tolist() if request.encoding_format == "float" else
                          base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(map(len, sequences)), "total_tokens": sum(map(len, sequences))}}

    def _answer(self, kind: str, choices: list, prompt_tokens: int, completions: list[Completion]) -> dict:
        generated = sum(len(c.tokens) for c in completions)
        return {"id": f"sajax-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
                "model": self.engine.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "created": 0,
                                            "owned_by": "sajax", "max_model_len": self.engine.context_length}]}


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def make_app(server: Server):
    """The FastAPI application of `server`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="sajax-serve")

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError):
        return _error(e.status, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", where)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await server.complete(request)

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest):
        return await server.embed(request)

    return app


class Running:
    """A server running in a background thread (tests, benchmarks): `url` ends in /v1; `close()` stops it."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.engine, self.url = engine, f"http://{host}:{sock.getsockname()[1]}/v1"
        config = uvicorn.Config(make_app(Server(engine)), log_level="warning", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"sajax-serve did not start on {host}:{port}")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, *, name: str = "", max_batch: int = 16,
          max_wait_ms: float = 5.0, max_queue: int = 256) -> None:
    """Loads the model (HF folder, GGUF file, known name or a sajax-train workdir) and serves it until
    interrupted."""
    import uvicorn

    model = lm.load(model_path)
    engine = Engine(model, name or model_path, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    print(f"sajax-serve: {name or model_path} on http://{host}:{port}/v1 (batches of up to {max_batch} rows)",
          flush=True)
    uvicorn.run(make_app(Server(engine)), host=host, port=port, log_level="info")
