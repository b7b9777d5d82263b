"""Inference: prefill / decode / sampling / scoring / embeddings (`generate`), conversations → log-likelihoods and
greedy replies for evaluations (`lm`), and the OpenAI-compatible server (`serve`). Imports `sajax.train` (to read a
training workdir's model) and below."""
