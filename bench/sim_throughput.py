"""Simulation throughput: the batched round engine vs agent-by-agent backend calls (how the original works).

Both variants run the same engine code; the sequential one wraps the backend so that every request is its own
call (one agent's draft, one peer's rating, ...), as a loop over agents calling an LM does. Two backends:

- `--backend local` (default): a random local sajax LLaMA; `--hidden 64 --layers 2` (default) is the size of
  configs/tiny.py (0.16M parameters), `--hidden 256 --layers 4` a 3.3M one. The batched engine chunks each
  stage into `--batch-size` rows, shares prompt prefixes within a chunk and reads a rating and its reason from
  one prefill; agent by agent, every request is a batch of one.
- `--model NAME`: a real model (a known name, HF folder or GGUF file) for agents, raters and the embedder, with
  configs/sim_smollm2.py's settings (`--observer-model` for the observers): one cold round (every shape compiled)
  and one warm round of the batched engine, each broken down by stage and by model call (compile, prefill,
  extend, decode, score, embed; the rest is host time), with tokens/s and the share of the roofline — the time the
  calls' weight matmuls need at this machine's measured fp32 matmul peak (prefill-like calls) or, for decode, the
  larger of that and reading every weight once per step at its measured memory bandwidth. Attention and the
  KV cache are left out of the roofline, so it is a lower bound on the time the work needs.
- `--backend api`: an OpenAI-compatible server (the original project's setting: it called the OpenAI API agent
  by agent) — here an in-process fake on 127.0.0.1 that answers every request after `--latency` seconds, so the
  comparison measures how the engine overlaps requests (`--concurrency`, backend.concurrency), not a model.

One warm-up round each (compiles), then `--repeats` measured rounds each, alternating (the same deterministic
round, so the measurement holds no compilation), reported as the median; interactions/s = agents' Back-Scatter
interactions per second.

    python bench/sim_throughput.py [--grid 10 --max-new-tokens 24 --hidden 64 --layers 2 --batch-size 8]
    python bench/sim_throughput.py --backend api [--latency 0.02 --concurrency 16]
    python bench/sim_throughput.py --model SmolLM2-135M-Instruct --grid 3 [--observer-model NAME]
"""

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sajax.config_files import load_config
from sajax.formats import tokenizer
from sajax.infer import profile
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


def machine_peaks(repeats: int = 5) -> tuple[float, float]:
    """(fp32 matmul FLOP/s, memory read bytes/s) measured here: a jitted [2048,2048]@[2048,2048] and a sum over
    256 MiB, best of `repeats`."""
    a = jnp.ones((2048, 2048), jnp.float32)
    x = jnp.ones((64 << 20,), jnp.float32)
    matmul, total = jax.jit(lambda a: a @ a), jax.jit(jnp.sum)
    peaks = []
    for f, arg, work in ((matmul, a, 2 * 2048 ** 3), (total, x, x.nbytes)):
        f(arg).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f(arg).block_until_ready()
            times.append(time.perf_counter() - start)
        peaks.append(work / min(times))
    return peaks[0], peaks[1]


class ModelCost:
    """FLOPs and weight bytes of one model: `body` multiply-adds per token (every weight matrix but the output
    layer), `head` per token whose next-token logits are computed."""

    def __init__(self, config, params):
        head = config.vocab_size * config.hidden_size
        embedding = head  # a lookup, no FLOPs
        self.body = config.num_params() - embedding - (0 if config.tie_word_embeddings else head)
        self.head = head
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    def roofline(self, call: profile.Call, flops_per_s: float, bytes_per_s: float) -> float:
        """Seconds the call needs at least: its matmul FLOPs at the peak (decode: or one read of the weights per
        step, whichever is longer)."""
        logits = call.tokens if call.kind in ("decode", "score") else (call.rows if call.kind != "embed" else 0)
        compute = 2 * (self.body * call.tokens + self.head * logits) / flops_per_s
        if call.kind == "decode":
            return max(compute, call.steps * self.weight_bytes / bytes_per_s)
        return compute


def breakdown(recorder: profile.Recorder, stage_seconds: dict, costs: dict, peaks: tuple[float, float]) -> None:
    """Prints one row per (stage, call kind) and per stage: seconds, compiles, tokens, tokens/s, roofline share."""
    print(f"  {'stage / call':28s} {'seconds':>8s} {'compile':>8s} {'compiles':>8s} {'tokens':>8s} {'padded':>8s} "
          f"{'tokens/s':>9s} {'roofline':>9s}")
    total_roof = 0.0
    for stage, wall in stage_seconds.items():
        calls = [c for c in recorder.calls if c.label == stage]
        roof = sum(costs[stage].roofline(c, *peaks) for c in calls)
        total_roof += roof
        in_calls = sum(c.seconds for c in calls)
        compile_outside = recorder.outside.get(stage, 0.0)
        print(f"  {stage:28s} {wall:8.2f} {sum(c.compile_seconds for c in calls) + compile_outside:8.2f} "
              f"{sum(c.compiles for c in calls):8d} {'':8s} {'':8s} {'':9s} {roof / wall:9.1%}")
        for kind in ("prefill", "extend", "score", "embed", "decode"):
            of_kind = [c for c in calls if c.kind == kind]
            if not of_kind:
                continue
            seconds = sum(c.seconds for c in of_kind)
            tokens = sum(c.tokens for c in of_kind)
            kind_roof = sum(costs[stage].roofline(c, *peaks) for c in of_kind)
            print(f"    {kind + f' ({len(of_kind)} calls)':26s} {seconds:8.2f} "
                  f"{sum(c.compile_seconds for c in of_kind):8.2f} {sum(c.compiles for c in of_kind):8d} "
                  f"{tokens:8d} {sum(c.padded_tokens for c in of_kind):8d} {tokens / seconds:9.1f} "
                  f"{kind_roof / seconds:9.1%}")
        print(f"    {'host (outside model calls)':26s} {wall - in_calls:8.2f} {compile_outside:8.2f}")
    wall = sum(stage_seconds.values())
    print(f"  {'round':28s} {wall:8.2f} {sum(c.compile_seconds for c in recorder.calls):8.2f} "
          f"{sum(c.compiles for c in recorder.calls):8d} {'':8s} {'':8s} {'':9s} {total_roof / wall:9.1%}   "
          f"(roofline {total_roof:.1f} s)")


class Labelled(Backend):
    """Records the backend's model calls under each request's stage."""

    def __init__(self, inner: Backend, recorder: profile.Recorder, seconds: dict):
        super().__init__(name=inner.name)
        self.inner, self.kind, self.recorder, self.seconds = inner, inner.kind, recorder, seconds
        self.stats, self.rating_readout = inner.stats, inner.rating_readout
        self.engagement_readout = inner.engagement_readout

    def _timed(self, method, requests, seed):
        stage = requests[0].stage if requests else ""
        start = time.perf_counter()
        with self.recorder.labelled(stage):
            out = method(requests, seed)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return out

    def generate(self, requests, seed):
        return self._timed(self.inner.generate, requests, seed)

    def rate(self, requests, seed):
        return self._timed(self.inner.rate, requests, seed)


class LabelledEmbedder:
    def __init__(self, inner, recorder: profile.Recorder, seconds: dict):
        self.inner, self.recorder, self.seconds = inner, recorder, seconds

    def embed(self, texts):
        start = time.perf_counter()
        with self.recorder.labelled("embed"):
            out = self.inner.embed(texts)
        self.seconds["embed"] = self.seconds.get("embed", 0.0) + time.perf_counter() - start
        return out


def profile_real_model(args):
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sim_smollm2.py")
    cfg.world.grid_size = args.grid
    cfg.backend.model_dir = args.model
    cfg.observer_backend.model_dir = args.observer_model or args.model
    if args.batch_size:
        cfg.backend.batch_size = cfg.observer_backend.batch_size = args.batch_size
    peaks = machine_peaks()
    print(f"this machine: fp32 matmul {peaks[0] / 1e9:.1f} GFLOP/s, memory read {peaks[1] / 1e9:.1f} GB/s "
          f"({jax.device_count()} CPU device, {len(jax.devices()[0].client.devices())} visible)")
    models = run.LocalModels(cfg.seed)
    backend = run.make_backend(cfg.backend, models, "backend")
    observer = run.make_backend(cfg.observer_backend, models, "observer_backend")
    costs = {}
    for stage in engine.STAGES + ("embed",):
        b = observer if stage.startswith("observe") else backend
        costs[stage] = ModelCost(b.config, b.params)
    wc = run.world_config(cfg)
    print(f"{args.grid}x{args.grid} society: agents {cfg.backend.model_dir} ({backend.config.num_params() / 1e6:.0f}M"
          f" parameters), observers {cfg.observer_backend.model_dir}, batch size {cfg.backend.batch_size}, "
          f"{cfg.backend.max_new_tokens} new tokens, {cfg.backend.reason_tokens} per reason, "
          f"{wc.num_observers} observer(s)")
    for name in ("cold round (compiles every shape)", "warm round (the same round again)"):
        seconds: dict = {}
        with profile.Recorder() as recorder:
            embedder = LabelledEmbedder(run.make_embedder(cfg.embedder, models, cfg.backend), recorder, seconds)
            rng = np.random.default_rng(cfg.seed)
            agents = run.new_agents(cfg, wc, rng, embedder, run.read_prior(cfg.prior_file))
            society = engine.Society(wc, engine.MemoryConfig(**cfg.memory), agents, rng, embedder, cfg.seed)
            questions = run.read_questions(cfg.questions_file)
            start = time.perf_counter()
            _, metrics = engine.run_round(society, 1, questions, Labelled(backend, recorder, seconds),
                                          Labelled(observer, recorder, seconds), wc.num_observers)
            wall = time.perf_counter() - start
        tokens = {s: (v["prompt_tokens"], v["completion_tokens"]) for s, v in metrics["stages"].items()}
        print(f"\n{name}: {wall:.1f} s ({sum(p for p, _ in tokens.values()):,} prompt and "
              f"{sum(c for _, c in tokens.values()):,} completion tokens; stages outside model calls: "
              f"{wall - sum(seconds.values()):.2f} s)")
        breakdown(recorder, seconds, costs, peaks)


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
    parser.add_argument("--batch-size", type=int, default=None,
                        help="backend.batch_size of the batched engine (default 8; with --model, the config's)")
    parser.add_argument("--latency", type=float, default=0.02, help="api: seconds per request")
    parser.add_argument("--concurrency", type=int, default=16, help="api: backend.concurrency")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per variant (median reported)")
    parser.add_argument("--model", default="", help="a real model: profile one cold and one warm round")
    parser.add_argument("--observer-model", default="", help="with --model: the observers' model (default: the same)")
    args = parser.parse_args()
    if args.model:
        return profile_real_model(args)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sim_tiny.py")
    cfg.world.grid_size = args.grid
    args.batch_size = args.batch_size or 8
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
