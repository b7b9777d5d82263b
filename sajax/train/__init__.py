"""Training: the objectives as sums and counts (`losses`), the jitted train and eval steps with exact gradient
accumulation (`step`), the run with its checks, checkpoints and resume (`loop`, `checkpoint`), metrics
(`metrics`), DPO reference log-probs (`reference`) and a checkpoint → HF folder (`export`). Imports
`sajax.data` and below."""
