"""SANDBOX: the simulated society (grid of LM-driven agents, Back-Scatter rounds) that writes alignment datasets.

`sim` uses `sajax` (model, tokenizer, generation) for its local LM backend; `sajax` never imports `sim`.
"""
