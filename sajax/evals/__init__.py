"""Evaluations of a model's social alignment: one module per evaluation, pure functions over a language model
(`sajax.infer.lm.LanguageModel`, or anything with its `loglikelihoods` method) and data; `sajax-eval` is their CLI.
Imports `sajax.infer` and below."""
