"""Alignment data: the TFDS dataset that is the contract between the simulator and the trainer and the other
formats the trainer reads (`alignment`), the synthetic demo set (`demo`), and the input pipeline — groups →
tokenized, sampled, truncated rows (`pipeline`), their fields and shardings (`batch`), shared-prompt packing
(`packing`). Imports `sajax.formats` (tokenizers) and below."""
