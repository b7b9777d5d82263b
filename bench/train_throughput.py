"""Training throughput: sajax's jitted Stable Alignment step vs how the original project trains.

(a) sajax: `sajax.train_step` (score-scaled margin loss, chunked output projection, AdamW, donation), jitted,
    several prompt groups per step.
(b) reference: transformers' PyTorch `LlamaForCausalLM`, one prompt group per step, each response's loss in a
    Python loop (a forward per response), the same margin loss, `torch.optim.AdamW` — the original project's loop.
Same model, same sequence length T and responses per group K, fp32, this machine's CPU, one run. Tokens counted
as processed positions (groups × K × T). MFU = model FLOPs (6·N + attention) / the measured fp32 matmul peak.

    python bench/train_throughput.py            # both configs below; needs the test extra (torch)
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from sajax import batch as batch_lib
from sajax import hf, input_pipeline, metrics, sharding
from sajax import train_step as ts
from sajax.config import LlamaConfig
from sajax.config_files import load_module

CONFIGS = {  # name: (HF config kwargs, groups per sajax step)
    "small (4 layers, hidden 256, vocab 8k)": (dict(vocab_size=8000, hidden_size=256, intermediate_size=688,
                                                    num_hidden_layers=4, num_attention_heads=8,
                                                    num_key_value_heads=4), 8),
    "~50M (8 layers, hidden 512, vocab 32k)": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                                    num_hidden_layers=8, num_attention_heads=8,
                                                    num_key_value_heads=8), 8),
}


tiny = load_module(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")


def synthetic_batch(groups, k, t, vocab, seed=0):
    """Random tokens, all rows full: first half prompt, second half response (the layout of `sajax.batch`)."""
    rng = np.random.default_rng(seed)
    batch = {name: np.zeros(s.shape, s.dtype) for name, s in batch_lib.abstract(groups, k, t).items()}
    batch["tokens"][:] = rng.integers(3, vocab, (groups, k, t))
    batch["loss_mask"][:, :, t // 2:] = 1
    batch["attention_mask"][:] = 1
    batch["scores"][:] = rng.integers(1, 8, (groups, k))
    batch["valid"][:] = True
    return batch


def train_cfg(groups, t, chunk):
    cfg = tiny.get_config()
    cfg.train.batch_size = groups
    cfg.train.loss_chunk_size = chunk
    cfg.data.max_len = t
    return cfg


def run_sajax(config, params, batch, steps, cfg):
    mesh = sharding.make_mesh()
    tx = ts.make_optimizer(cfg.optimizer, 1000, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, 1000)
    shardings = ts.state_shardings(config, tx, mesh)
    with sharding.activation_rules(mesh):
        state = ts.init_state(params, tx, shardings)
        step = ts.make_train_step(config, cfg.train, tx, schedule, mesh, shardings)
        batch = input_pipeline.to_global(batch, mesh)
        for _ in range(2):  # compile + warm-up
            state, out = step(state, batch)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(steps):
            state, out = step(state, batch)
        jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps, float(out["loss"])


def run_torch_reference(torch_model, batch, steps):
    """One group per optimizer step, one forward per response, as the original training loop."""
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    loss_mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32)
    scores = batch["scores"]

    def group_step(g):
        nll = []
        for k in range(tokens.shape[1]):  # the per-response Python loop
            logits = torch_model(input_ids=tokens[g, k:k + 1]).logits[0, :-1]
            token_nll = torch.nn.functional.cross_entropy(logits, tokens[g, k, 1:], reduction="none")
            weights = loss_mask[g, k, 1:]
            nll.append((token_nll * weights).sum() / weights.sum())
        best = int(np.argmax(scores[g]))
        gaps = [nll[best] - nll[k] + (scores[g, best] - scores[g, k]) / 7.0 for k in range(len(nll)) if k != best]
        loss = nll[best] + 0.2 * torch.clamp(torch.stack(gaps).mean(), min=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    group_step(0)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        group_step(i % tokens.shape[0])
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16,
                        help="train.loss_chunk_size: on CPU, small blocks of logits stay in cache (fastest here)")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    peak = metrics.measure_matmul_peak()
    print(f"{jax.devices()[0].platform}: {len(jax.devices())} device(s), torch threads {torch.get_num_threads()}; "
          f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; T={args.seq}, K={args.k}, fp32, "
          f"loss chunk {args.chunk}")
    for name, (hf_kwargs, groups) in CONFIGS.items():
        torch.manual_seed(0)
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **hf_kwargs, max_position_embeddings=args.seq)).train()
        config = LlamaConfig.from_hf_dict(torch_model.config.to_dict())
        params = hf.params_from_hf_state(config, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
        batch = synthetic_batch(groups, args.k, args.seq, config.vocab_size)
        cfg = train_cfg(groups, args.seq, args.chunk)
        seconds, _ = run_sajax(config, params, batch, args.steps, cfg)
        sajax_tps = groups * args.k * args.seq / seconds
        mfu = metrics.train_flops_per_token(config, args.seq) * sajax_tps / (peak * len(jax.devices()))
        torch_seconds = run_torch_reference(torch_model, batch, args.steps)
        torch_tps = args.k * args.seq / torch_seconds
        print(f"\n{name}: {config.num_params() / 1e6:.1f}M params")
        print(f"  sajax jitted step, {groups} groups/step   {sajax_tps:9.0f} tokens/s   MFU {mfu:.1%}")
        print(f"  PyTorch loop, 1 group/step, per-response {torch_tps:9.0f} tokens/s")
        print(f"  ratio sajax / PyTorch reference: {sajax_tps / torch_tps:.2f}x")


if __name__ == "__main__":
    main()
