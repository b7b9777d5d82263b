"""Memory search: ScaNN (as sim.memory tunes it from the corpus size) vs exact search, side by side.

Clustered unit vectors (like sentence embeddings: topics plus noise), 1M × 256 by default; recall@10 of ScaNN
against the exact top-10, and the query-time speedup on the same 1000 queries (batched, same thread count).

    python bench/memory_search.py [--size 1000000 --dim 256 --queries 1000]
"""

import argparse
import time

import numpy as np

from sim.memory import VectorIndex, scann_tuning


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    corpus = np.empty((args.size, args.dim), np.float32)
    for start in range(0, args.size, 100_000):  # in blocks, to keep peak memory near the corpus size
        n = min(100_000, args.size - start)
        corpus[start:start + n] = centres[rng.integers(0, args.clusters, n)] + 0.5 * rng.normal(
            size=(n, args.dim)).astype(np.float32)
    queries = centres[rng.integers(0, args.clusters, args.queries)] + 0.5 * rng.normal(
        size=(args.queries, args.dim)).astype(np.float32)

    start = time.perf_counter()
    approx = VectorIndex(corpus, k=10, scann_min_size=0)
    build = time.perf_counter() - start
    exact = VectorIndex(corpus, k=10, scann_min_size=10**12)
    approx.search(queries[:10])
    exact.search(queries[:10])  # warm-up
    start = time.perf_counter()
    found, _ = approx.search(queries)
    scann_seconds = time.perf_counter() - start
    start = time.perf_counter()
    truth, _ = exact.search(queries)
    exact_seconds = time.perf_counter() - start
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    tuning = scann_tuning(args.size, 10)
    print(f"corpus {args.size:,} x {args.dim} (clustered, {args.clusters} topics), {args.queries} queries, k=10")
    print(f"ScaNN: {tuning.num_leaves} leaves, {tuning.leaves_to_search} searched, reorder {tuning.reorder}; "
          f"built in {build:.1f} s")
    print(f"exact  {exact_seconds * 1e3 / args.queries:8.3f} ms/query")
    print(f"ScaNN  {scann_seconds * 1e3 / args.queries:8.3f} ms/query")
    print(f"recall@10 {recall:.4f}   speedup {exact_seconds / scann_seconds:.1f}x")


if __name__ == "__main__":
    main()
