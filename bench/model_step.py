"""Forward+backward throughput: sajax's jitted Flax LLaMA vs transformers' PyTorch LlamaForCausalLM.

Same config, same weights, same batch, fp32, on this machine's CPU; one run, both measured side by side: the two
steps alternate (jax, torch, jax, torch, …) so that both see the same machine load, and the median step is
reported. The loss is mean next-token cross-entropy over all positions — sajax's training path
(`decoder.hidden_states` + `losses.response_token_nll`, output projection in chunks of `--loss-chunk` positions),
transformers' `labels=` loss.
    python bench/model_step.py [--layers 4 --hidden 256 --vocab 8000 --batch 8 --seq 256 --steps 9]
Needs the test extra (torch).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from sajax.formats import layout
from sajax.model import decoder
from sajax.model.config import ModelConfig
from sajax.train import losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--loss-chunk", type=int, default=0, help="positions per output-projection chunk; 0: all")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq)).train()
    config = ModelConfig.from_hf_dict(torch_model.config.to_dict())
    params = jax.device_put(layout.params_from_hf_state(
        config, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}))
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = ids.size

    def loss_fn(params, ids, mask):
        """Mean next-token cross-entropy over positions 1…T−1, as the trainer computes it."""
        hidden = decoder.hidden_states(config, params, ids, mask)
        nll = losses.response_token_nll(hidden, decoder.output_weights(config, params), ids, mask,
                                        args.loss_chunk or args.seq)
        return jnp.sum(nll.total) / jnp.sum(nll.count)

    jax_step = jax.jit(jax.value_and_grad(loss_fn))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    def run_jax():
        loss, grads = jax_step(params, ids_j, mask_j)
        jax.block_until_ready(grads)
        return float(loss)

    ids_t = torch.as_tensor(ids, dtype=torch.long)

    def run_torch():
        torch_model.zero_grad(set_to_none=True)
        loss = torch_model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        return loss.item()

    print(f"config: {config.num_params() / 1e6:.1f}M params, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; fp32; {jax.devices()[0].platform}, "
          f"torch threads {torch.get_num_threads()}")
    runs = {"sajax (jax.jit)": run_jax, "transformers (torch)": run_torch}
    losses_seen = {name: [run() for _ in range(2)][-1] for name, run in runs.items()}  # warm-up / compile
    seconds = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    tps = {}
    for name in runs:
        median = float(np.median(seconds[name]))
        tps[name] = tokens / median
        print(f"{name:22s} {tps[name]:10.0f} tokens/s  {median * 1e3:8.1f} ms/step (median of {args.steps})  "
              f"loss {losses_seen[name]:.5f}")
    (jax_tps, torch_tps), (jax_loss, torch_loss) = tps.values(), losses_seen.values()
    print(f"ratio sajax / torch: {jax_tps / torch_tps:.2f}x   |loss difference| {abs(jax_loss - torch_loss):.2e}")


if __name__ == "__main__":
    main()
