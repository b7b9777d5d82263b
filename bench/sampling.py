"""Top-k/top-p sampling step: sajax's `generate.sample_logits` (thresholds by bisection over float bit patterns,
inverse-CDF draw) vs the usual implementation (sort the vocabulary, cumulative sums, Gumbel-max draw over every
entry), jitted, same logits; ms per call and the ratio, for a few batch and vocabulary sizes.

    python bench/sampling.py [--top-k 0 --top-p 0.95 --temperature 0.7]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from sajax.infer import generate


def sorted_sampling(logits, rng, temperature, top_k, top_p):
    """The sort-based reference: top-k, then top-p on the renormalised rest, then jax.random.categorical."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    vocab = scaled.shape[-1]
    descending = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take(descending, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    descending = jnp.where(descending >= kth, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    pth = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    kept = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
    return jax.random.categorical(rng, kept, axis=-1).astype(jnp.int32)


def milliseconds(fn, logits, args, repeats=20):
    fn(logits, jax.random.key(0), *args).block_until_ready()
    start = time.perf_counter()
    for i in range(repeats):
        out = fn(logits, jax.random.key(i), *args)
    out.block_until_ready()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    sampling = (jnp.float32(args.temperature), jnp.int32(args.top_k), jnp.float32(args.top_p))
    ours, reference = jax.jit(generate.sample_logits), jax.jit(sorted_sampling)
    print(f"{'vocab':>7s} {'batch':>5s} {'sort (ms)':>10s} {'sajax (ms)':>10s} {'ratio':>6s}")
    for vocab in (512, 32000, 128256):
        for batch in (1, 8, 64):
            logits = jax.random.normal(jax.random.key(1), (batch, vocab)) * 3
            slow, fast = milliseconds(reference, logits, sampling), milliseconds(ours, logits, sampling)
            print(f"{vocab:7d} {batch:5d} {slow:10.3f} {fast:10.3f} {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
