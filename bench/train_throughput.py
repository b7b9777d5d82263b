"""Training throughput: sajax's jitted Stable Alignment step vs how the original project trains.

(a) sajax: `sajax.train.step` (score-scaled margin loss, chunked output projection, AdamW, donation), jitted,
    several prompt groups per step.
(b) reference: transformers' PyTorch `LlamaForCausalLM`, one prompt group per step, each response's loss in a
    Python loop (a forward per response), the same margin loss, `torch.optim.AdamW` — the original project's loop.
Same model, same sequence length T and responses per group K, fp32, this machine's CPU, one run. Tokens counted
as processed positions (groups × K × T). MFU = model FLOPs (6·N + attention) / the measured fp32 matmul peak.

Dataset mode (`--data PATH`, repeatable: a TFDS alignment dataset such as `sajax-sim-dataset`'s output, or a
release-format JSON/JSONL file): the real length distribution of that data, tokenized by SmolLM2's tokenizer
(the `small` model below with its vocabulary; `--groups` per step, default 32 as `configs/original_readme.py`),
through the real input pipeline and train step, padded (`sajax.data.batch`) vs packed (`sajax.data.packing`,
data.packing), the same batches in both. Reported per layout: useful
tokens per step (each group's prompt once + its responses: no padding, no repeated prompt), the share of
computed positions that are padding and repeated prompts, and useful tokens/s (time per step: the median over
a second pass over the same batches, the two layouts alternating step by step, after a first pass that compiled
every shape).

    python bench/train_throughput.py            # both configs below; needs the test extra (torch)
    python bench/train_throughput.py --data /tmp/society-data [--data release.jsonl] [--max-len 256]
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from sajax.config_files import load_module
from sajax.data import alignment, packing, pipeline
from sajax.data import batch as batch_lib
from sajax.formats import known_models, layout
from sajax.formats import tokenizer as tokenizer_lib
from sajax.model import decoder
from sajax.model.config import ModelConfig
from sajax.parallel import sharding
from sajax.train import loop, metrics
from sajax.train import step as ts

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
    """Random tokens, all rows full: first half prompt, second half response (the layout of `sajax.data.batch`)."""
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


def trainer(config, params, cfg, mesh, packed=False):
    """The trainer's jitted train step for `cfg` (optimizer, schedule, state shardings) and a fresh state from
    `params`; call inside `sharding.activation_rules(mesh)`."""
    tx = ts.make_optimizer(cfg.optimizer, 1000, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, 1000)
    shardings = ts.state_shardings(config, tx, mesh)
    step = ts.make_train_step(config, cfg.train, tx, schedule, mesh, shardings, packed=packed)
    trainable, frozen = ts.split_trainable(config, params)
    return (lambda state, batch: step(state, batch, frozen)), ts.init_state(trainable, tx, shardings)


def run_sajax(config, params, batch, steps, cfg):
    mesh = sharding.make_mesh()
    with sharding.activation_rules(mesh):
        step, state = trainer(config, params, cfg, mesh)
        batch = pipeline.to_global(batch, mesh)
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


def useful_tokens(groups: dict) -> int:
    """Σ over groups of (longest kept prompt + every response's tokens) of a padded batch ([B, K, T] arrays)."""
    length = groups["attention_mask"].sum(-1)  # [B, K]
    response = groups["loss_mask"].sum(-1)
    prompt = np.where(groups["valid"], length - response, 0)
    return int(prompt.max(-1).sum() + response.sum())


def dataset_mode(args, path: str):
    tok = tokenizer_lib.load_tokenizer(known_models.resolve("SmolLM2-135M-Instruct"))
    hf_kwargs, _ = CONFIGS["small (4 layers, hidden 256, vocab 8k)"]
    groups_per_step = args.groups
    config = ModelConfig.from_hf_dict(dict(transformers.LlamaConfig(**{**hf_kwargs, "vocab_size": len(tok)},
                                                                    max_position_embeddings=args.max_len)
                                           .to_dict()))
    source = alignment.GroupSource(path, "train")
    encoder = pipeline.GroupEncoder(tok, args.max_len, args.max_len // 2, args.k,
                                          chat=tokenizer_lib.has_chat_template(tok))
    cfg = train_cfg(groups_per_step, args.max_len, args.chunk)
    cfg.data.update(num_comp=args.k, pack_len=args.pack_len)
    row_len = loop.pack_len(cfg)
    mesh = sharding.make_mesh()
    params = decoder.init_params(config, 0)
    padded = list(_batches(source, encoder, groups_per_step, args.data_steps, None))
    packer = pipeline.make_packer(encoder, mesh, groups_per_step, 1, row_len)
    packed = list(_batches(source, encoder, groups_per_step, args.data_steps, packer))
    useful = sum(useful_tokens(b) for b in padded)
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    positions = sum(b["tokens"].size for b in padded)
    packed_positions = sum(b["tokens"].size for b in packed)
    packed_real = sum(packing.non_padding_tokens(b) for b in packed)
    print(f"\n{path} [train]: {len(source)} groups; {args.data_steps} steps of {groups_per_step} groups, K={args.k}, "
          f"max_len {args.max_len}, pack_len {row_len}; "
          f"{config.num_params() / 1e6:.1f}M params (vocab {config.vocab_size})")
    print(f"  useful tokens/step {useful / args.data_steps:.0f}; padded layout: {positions / args.data_steps:.0f} "
          f"positions/step, {1 - real / positions:.1%} padding, {(real - useful) / positions:.1%} repeated prompts; "
          f"packed: {packed_positions / args.data_steps:.0f} positions/step, "
          f"{1 - packed_real / packed_positions:.1%} padding, {(packed_real - useful) / packed_positions:.1%} "
          "repeated prompt tokens (each response span starts with the prompt's last token)")
    seconds = run_side_by_side(config, params, {"padded": padded, "packed": packed}, cfg, mesh)
    results = {}
    for name, per_step in seconds.items():
        results[name] = useful / (per_step * args.data_steps)
        print(f"  {name:7s} {per_step * 1e3:8.1f} ms/step   {results[name]:9.0f} useful tokens/s")
    print(f"  ratio packed / padded (useful tokens/s): {results['packed'] / results['padded']:.2f}x")


def _batches(source, encoder, groups, steps, packer):
    data = pipeline.train_dataset(source, encoder, batch_size=groups, seed=0, read_threads=1, packer=packer)
    iterator = iter(data)
    return (next(iterator) for _ in range(steps))


def run_side_by_side(config, params, layouts: dict, cfg, mesh) -> dict[str, float]:
    """Median seconds per step of each layout's batches (name: list of batches, `packing.is_packed` or not). A
    first pass compiles every shape; then the layouts alternate step by step over the same batches, so that
    both see the same machine load."""
    runs = {}
    with sharding.activation_rules(mesh):
        for name, batches in layouts.items():
            step, state = trainer(config, params, cfg, mesh, packed=packing.is_packed(batches[0]))
            arrays = [pipeline.to_global(b, mesh) for b in batches]
            for batch in arrays:  # compile every shape
                state, out = step(state, batch)
            jax.block_until_ready(out)
            runs[name] = [step, state, arrays, []]
        for i in range(len(next(iter(layouts.values())))):
            for run in runs.values():
                step, state, arrays, times = run
                start = time.perf_counter()
                run[1], out = step(state, arrays[i])
                jax.block_until_ready(out)
                times.append(time.perf_counter() - start)
    return {name: float(np.median(run[3])) for name, run in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="dataset mode: a TFDS dataset or release-format file")
    parser.add_argument("--max-len", type=int, default=256, help="dataset mode: data.max_len")
    parser.add_argument("--pack-len", type=int, default=0, help="dataset mode: data.pack_len (0: K × max_len)")
    parser.add_argument("--groups", type=int, default=32, help="dataset mode: groups per step")
    parser.add_argument("--data-steps", type=int, default=4, help="dataset mode: steps (batches) measured")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16,
                        help="train.loss_chunk_size: on CPU, small blocks of logits stay in cache (fastest here)")
    args = parser.parse_args()
    if args.data:
        for path in args.data:
            dataset_mode(args, path)
        return
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    peak = metrics.measure_matmul_peak()
    print(f"{jax.devices()[0].platform}: {len(jax.devices())} device(s), torch threads {torch.get_num_threads()}; "
          f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; T={args.seq}, K={args.k}, fp32, "
          f"loss chunk {args.chunk}")
    for name, (hf_kwargs, groups) in CONFIGS.items():
        torch.manual_seed(0)
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **hf_kwargs, max_position_embeddings=args.seq)).train()
        config = ModelConfig.from_hf_dict(torch_model.config.to_dict())
        state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
        params = layout.params_from_hf_state(config, state)
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
