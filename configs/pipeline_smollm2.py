"""The closed loop with a real model on CPU: SmolLM2-135M-Instruct (fetched once per machine,
sajax.formats.known_models) as the society's agents and observers (`sim_smollm2.py`, 2 rounds), as the policy
trained with Stable Alignment and with SFT on the society's data (chat-template prompts, 24 steps of 4 groups), and
as the judge of the evaluations (p(Yes) readout). Then one round of the society with the Stable-Alignment-trained
model as every agent.

    sajax-pipeline --config configs/pipeline_smollm2.py --workdir /tmp/pipeline-smollm2
"""

from pathlib import Path

from sajax.config_files import load_config

HERE = Path(__file__).parent
MODEL = "SmolLM2-135M-Instruct"


def get_config():
    config = load_config(HERE / "pipeline_tiny.py")  # the same sections, set below
    config.sim = load_config(HERE / "sim_smollm2.py")
    config.sim.rounds = 2
    config.train.init_from = MODEL
    config.train.data.update(dict(max_len=160, max_prompt_len=96, prompt_format="chat",
                                  packing=True))  # 2.25× the useful tokens/s of padded rows on society data (README)
    config.train.train.update(dict(steps=24, batch_size=4))
    config.train.optimizer.update(dict(learning_rate=5e-5, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.0))
    config.train.checkpoint.every = 8
    config.train.log_every = 4
    config.eval.update(dict(judge=MODEL, judge_readout="yes_no", limit=32, max_new_tokens=64, batch_size=16))
    return config
