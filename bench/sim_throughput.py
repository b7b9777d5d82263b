"""Simulation throughput: the batched round engine vs agent-by-agent backend calls (how the original works).

A 10×10 society whose agents and observers are a small random local sajax LLaMA (default 4 layers, hidden 256,
3.3M parameters; `--hidden 64 --layers 2` is configs/tiny.py's 0.16M). Both variants run the same engine code;
the sequential one wraps the backend so that every request is its own call (one agent's draft, one peer's
rating, ...), as a loop over agents calling an LM does. One warm-up round each (compiles), then one measured
round each (the same deterministic round, so the measurement holds no compilation); interactions/s = agents'
Back-Scatter interactions per second.

    python bench/sim_throughput.py [--grid 10 --max-new-tokens 24 --hidden 256 --layers 4]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sajax import model, tokenizer
from sajax.config import LlamaConfig
from sajax.config_files import load_config
from sim import engine, run
from sim.backends import Backend, LocalBackend


class OneAtATime(Backend):
    """Every request becomes its own backend call."""

    def __init__(self, inner: Backend):
        super().__init__()
        self.inner, self.kind, self.name = inner, inner.kind, inner.name
        self.stats = inner.stats

    def generate(self, requests, seed):
        return [self.inner.generate([r], seed + i)[0] for i, r in enumerate(requests)]

    def rate(self, requests, seed):
        return [self.inner.rate([r], seed + i)[0] for i, r in enumerate(requests)]


def one_round(cfg, backend, observer, workdir, round_index):
    wc = run.world_config(cfg)
    models = run.LocalModels(Path(workdir), cfg.seed)
    embedder = run.make_embedder(cfg.embedder, models, cfg.backend)
    rng = np.random.default_rng(cfg.seed)
    society = engine.Society(wc, engine.MemoryConfig(**cfg.memory), run.new_agents(cfg, wc, rng, embedder), rng,
                             embedder, cfg.seed)
    questions = run.read_questions(cfg.questions_file)
    start = time.perf_counter()
    engine.run_round(society, round_index, questions, backend, observer, wc.num_observers)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="backend.batch_size of the batched engine")
    args = parser.parse_args()
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sim_tiny.py")
    cfg.world.grid_size = args.grid
    with tempfile.TemporaryDirectory() as workdir:
        config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 32, 2),
                             num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=2048,
                             bos_token_id=1, eos_token_id=2, pad_token_id=3)
        tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), Path(workdir) / "tokenizer", vocab_size=512)
        params = model.init_params(config, 0)
        backend, observer = (LocalBackend(config, params, tok, max_new_tokens=args.max_new_tokens,
                                          reason_tokens=args.max_new_tokens // 2, batch_size=args.batch_size)
                             for _ in range(2))
        print(f"model: {config.num_params() / 1e6:.2f}M parameters")
        agents = args.grid ** 2
        results = {}
        for name, (b, o) in {"batched engine": (backend, observer),
                             "agent by agent": (OneAtATime(backend), OneAtATime(observer))}.items():
            one_round(cfg, b, o, workdir, 1)  # warm-up: the same round, so every shape is compiled once
            seconds = one_round(cfg, b, o, workdir, 1)
            results[name] = agents / seconds
            print(f"{name:16s} {seconds:8.2f} s/round   {agents / seconds:8.2f} interactions/s")
    print(f"{args.grid}x{args.grid} world, local model, {args.max_new_tokens} new tokens; "
          f"ratio batched / agent-by-agent: {results['batched engine'] / results['agent by agent']:.1f}x")


if __name__ == "__main__":
    main()
