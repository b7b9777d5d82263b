"""Inference: prefill / decode / sampling / scoring / embeddings (`generate`), conversations → log-likelihoods and
greedy replies for evaluations (`lm`), the OpenAI-compatible server (`serve`), and where the time of model calls
goes (`profile`, off unless a recorder is active). Imports `sajax.train` (to read a training workdir's model, and
the chunked token log-likelihood scoring shares with the loss) and below."""
