"""sajax-serve throughput: requests/s and generated tokens/s at concurrency 1 / 16 / 64 through HTTP (the official
openai client, async), against the in-process local backend (`sim.local_backend.LocalBackend`) generating the same
prompts with the same batch size — what the server's HTTP, JSON and batching cost.

Each level sends `max(--min-requests, 2 × concurrency)` draft prompts (the simulator's own, on its built-in
questions) with `--max-tokens` new tokens at temperature 0.7; the local backend gets the same prompts as one stage
call, chunked into `--max-batch` rows. One warm-up pass per level (compiles), then the measured pass. Generated
tokens are counted from the answers' usage (server) and the decode lengths (local backend), end-of-turn included.

    python bench/serve.py [--model SmolLM2-135M-Instruct --max-tokens 32 --max-batch 16 --levels 1,16,64]
"""

import argparse
import asyncio
import time

import openai

from sajax.infer import lm, serve
from sim import prompts, run
from sim.backends import Request
from sim.local_backend import LocalBackend


def served(url: str, texts: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) for `texts` sent with at most `concurrency` requests in flight."""

    async def main():
        limit = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as sdk:
            async def one(i, text):
                async with limit:
                    answer = await sdk.chat.completions.create(
                        model="bench", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                        temperature=0.7, seed=i)
                    return answer.usage.completion_tokens

            start = time.perf_counter()
            tokens = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
            return time.perf_counter() - start, sum(tokens)

    return asyncio.run(main())


def local(backend: LocalBackend, requests: list[Request]) -> tuple[float, int]:
    before = backend.stats.get("draft")
    tokens_before = before.completion_tokens if before else 0
    start = time.perf_counter()
    backend.generate(requests, seed=0)
    return time.perf_counter() - start, backend.stats["draft"].completion_tokens - tokens_before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--min-requests", type=int, default=8)
    args = parser.parse_args()

    model = lm.load(args.model)
    engine = serve.Engine(model, "bench", max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=1024)
    server = serve.Running(engine)
    backend = LocalBackend(model.config, model.params, model.tokenizer, max_new_tokens=args.max_tokens,
                           temperature=0.7, batch_size=args.max_batch)
    questions = run.read_questions("")
    print(f"{args.model}: {args.max_tokens} new tokens per request, batches of up to {args.max_batch} rows, "
          f"max_wait_ms {args.max_wait_ms}")
    print(f"{'concurrency':>11s} {'requests':>8s} {'served req/s':>12s} {'served tok/s':>12s} {'local req/s':>11s} "
          f"{'local tok/s':>11s} {'served/local':>12s} {'mean batch':>10s}")
    try:
        for concurrency in (int(x) for x in args.levels.split(",")):
            n = max(args.min_requests, 2 * concurrency)
            asked = [questions[i % len(questions)] for i in range(n)]
            drafts = [prompts.draft(q, []) for q in asked]
            texts = [d.completion for d in drafts]
            requests = [Request(d, q, stage="draft") for d, q in zip(drafts, asked)]
            served(server.url, texts, concurrency, args.max_tokens)  # warm-up: compiles the batch shapes
            local(backend, requests)
            first = len(engine.batches)
            served_s, served_tokens = served(server.url, texts, concurrency, args.max_tokens)
            batches = engine.batches[first:]
            local_s, local_tokens = local(backend, requests)
            print(f"{concurrency:11d} {n:8d} {n / served_s:12.2f} {served_tokens / served_s:12.1f} "
                  f"{n / local_s:11.2f} {local_tokens / local_s:11.1f} "
                  f"{(served_tokens / served_s) / (local_tokens / local_s):11.2f}× "
                  f"{sum(batches) / len(batches):10.1f}", flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    main()
