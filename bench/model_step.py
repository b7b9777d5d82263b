"""Forward+backward throughput: sajax's jitted Flax LLaMA vs transformers' PyTorch LlamaForCausalLM.

Same config, same weights, same batch, fp32, on this machine's CPU; one run, both measured side by side.
    python bench/model_step.py [--layers 4 --hidden 256 --vocab 8000 --batch 8 --seq 256 --steps 5]
Needs the test extra (torch).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from sajax import hf, model


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
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq)).train()
    config = model.LlamaConfig.from_hf_dict(torch_model.config.to_dict())
    params = jax.device_put(hf.params_from_hf_state(
        config, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}))
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = ids.size

    def loss_fn(params, ids, mask):
        """Mean next-token cross-entropy: logsumexp(logits) − logit of the target (picked with a one-hot
        product, whose backward is dense: a gather's backward is a scatter, slow on XLA:CPU)."""
        logits = model.forward(config, params, ids, mask)[:, :-1]
        target = jnp.einsum("btv,btv->bt", logits, jax.nn.one_hot(ids[:, 1:], config.vocab_size))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

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
    results = {}
    for name, run in (("sajax (jax.jit)", run_jax), ("transformers (torch)", run_torch)):
        loss = [run() for _ in range(2)][-1]  # warm-up / compile
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        seconds = (time.perf_counter() - start) / args.steps
        results[name] = (tokens / seconds, loss)
        print(f"{name:22s} {tokens / seconds:10.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  loss {loss:.5f}")
    (jax_tps, jax_loss), (torch_tps, torch_loss) = results.values()
    print(f"ratio sajax / torch: {jax_tps / torch_tps:.2f}x   |loss difference| {abs(jax_loss - torch_loss):.2e}")


if __name__ == "__main__":
    main()
