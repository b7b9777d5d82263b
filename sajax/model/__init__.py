"""The model: `config` (the architecture with Hugging Face's field names, per-family switches, run-time options) and
`decoder` (one Flax decoder-only transformer for every supported family, its parameters' logical axes and
initialisation). Imports only `sajax.parallel`."""
