"""Simulation throughput: the batched round engine vs agent-by-agent backend calls (how the original works).

Both variants run the same engine code; the sequential one wraps the backend so that every request is its own
call (one agent's draft, one peer's rating, ...), as a loop over agents calling an LM does. Two backends:

- `--backend local` (default): a random local sajax LLaMA; `--hidden 64 --layers 2` (default) is the size of
  configs/tiny.py (0.16M parameters), `--hidden 256 --layers 4` a 3.3M one. The batched engine chunks each
  stage into `--batch-size` rows, shares prompt prefixes within a chunk and reads a rating and its reason from
  one prefill; agent by agent, every request is a batch of one.
- `--backend api`: an OpenAI-compatible server (the original project's setting: it called the OpenAI API agent
  by agent) — here an in-process fake on 127.0.0.1 that answers every request after `--latency` seconds, so the
  comparison measures how the engine overlaps requests (`--concurrency`, backend.concurrency), not a model.

One warm-up round each (compiles), then `--repeats` measured rounds each, alternating (the same deterministic
round, so the measurement holds no compilation), reported as the median; interactions/s = agents' Back-Scatter
interactions per second.

    python bench/sim_throughput.py [--grid 10 --max-new-tokens 24 --hidden 64 --layers 2 --batch-size 8]
    python bench/sim_throughput.py --backend api [--latency 0.02 --concurrency 16]
"""

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from sajax.config_files import load_config
from sajax.formats import tokenizer
from sajax.model import decoder
from sajax.model.config import ModelConfig
from sim import engine, run
from sim.backends import Backend
from sim.local_backend import LocalBackend
from sim.openai_backend import OpenAIBackend, OpenAIClient


class OneAtATime(Backend):
    """Every request becomes its own backend call."""

    def __init__(self, inner: Backend):
        super().__init__(name=inner.name)
        self.inner, self.kind = inner, inner.kind
        self.stats = inner.stats

    def generate(self, requests, seed):
        return [self.inner.generate([r], seed + i)[0] for i, r in enumerate(requests)]

    def rate(self, requests, seed):
        return [self.inner.rate([r], seed + i)[0] for i, r in enumerate(requests)]


def one_round(cfg, backend, observer, round_index):
    wc = run.world_config(cfg)
    models = run.LocalModels(cfg.seed)
    embedder = run.make_embedder(cfg.embedder, models, cfg.backend)
    rng = np.random.default_rng(cfg.seed)
    agents = run.new_agents(cfg, wc, rng, embedder, run.read_prior(cfg.prior_file))
    society = engine.Society(wc, engine.MemoryConfig(**cfg.memory), agents, rng, embedder, cfg.seed)
    questions = run.read_questions(cfg.questions_file)
    start = time.perf_counter()
    engine.run_round(society, round_index, questions, backend, observer, wc.num_observers)
    return time.perf_counter() - start


def slow_server(latency: float) -> ThreadingHTTPServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 answering after `latency` seconds."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            time.sleep(latency)
            text = ("Rating: 5 ### Reason: it is considerate." if prompt.rstrip().endswith("Rating:")
                    else "I would listen to them and help, because that is kind.")
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 9}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

    class Server(ThreadingHTTPServer):
        request_queue_size, daemon_threads = 128, True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def local_backends(args, workdir):
    config = ModelConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 32, 2),
                         num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), Path(workdir) / "tokenizer", vocab_size=512)
    params = decoder.init_params(config, 0)
    print(f"local model: {config.num_params() / 1e6:.2f}M parameters, batch size {args.batch_size}, "
          f"{args.max_new_tokens} new tokens ({args.max_new_tokens // 2} per reason)")
    return [LocalBackend(config, params, tok, max_new_tokens=args.max_new_tokens,
                         reason_tokens=args.max_new_tokens // 2, batch_size=args.batch_size) for _ in range(2)]


def api_backends(args, server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    print(f"OpenAI-compatible server: {args.latency * 1e3:.0f} ms per request, concurrency {args.concurrency}")
    return [OpenAIBackend(OpenAIClient(url), "fake", concurrency=args.concurrency) for _ in range(2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("local", "api"), default="local")
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="backend.batch_size of the batched engine")
    parser.add_argument("--latency", type=float, default=0.02, help="api: seconds per request")
    parser.add_argument("--concurrency", type=int, default=16, help="api: backend.concurrency")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per variant (median reported)")
    args = parser.parse_args()
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sim_tiny.py")
    cfg.world.grid_size = args.grid
    server = slow_server(args.latency) if args.backend == "api" else None
    with tempfile.TemporaryDirectory() as workdir:
        backend, observer = local_backends(args, workdir) if server is None else api_backends(args, server)
        agents = args.grid ** 2
        variants = {"batched engine": (backend, observer),
                    "agent by agent": (OneAtATime(backend), OneAtATime(observer))}
        for b, o in variants.values():
            one_round(cfg, b, o, 1)  # warm-up: the same round, so every shape is compiled once
        seconds, calls = {name: [] for name in variants}, {}
        for _ in range(args.repeats):  # alternating, so a slow spell of a shared machine hits both
            for name, (b, o) in variants.items():
                calls_before = sum(s.calls for x in (backend, observer) for s in x.stats.values())
                seconds[name].append(one_round(cfg, b, o, 1))
                calls[name] = sum(s.calls for x in (backend, observer) for s in x.stats.values()) - calls_before
        results = {}
        for name, times in seconds.items():
            median = float(np.median(times))
            results[name] = agents / median
            print(f"{name:16s} {median:8.2f} s/round (median of {len(times)}: "
                  f"{', '.join(f'{t:.2f}' for t in times)})   {agents / median:8.2f} interactions/s   "
                  f"({calls[name]} requests)")
    if server is not None:
        server.shutdown()
    print(f"{args.grid}x{args.grid} world, {args.backend} backend; "
          f"ratio batched / agent-by-agent: {results['batched engine'] / results['agent by agent']:.1f}x")


if __name__ == "__main__":
    main()
