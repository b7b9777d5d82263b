"""The closed loop on CPU in about two minutes (the embedded default of `sajax-pipeline`): a 3×3 society of scripted
agents for 3 rounds (`sim_tiny.py`), its alignment dataset, a tiny random LLaMA trained on it with Stable Alignment
and with SFT (`tiny.py`), both and the untrained model evaluated — judged by the society's own scripted observers —
and one more round with the Stable-Alignment-trained model as every agent.

    sajax-pipeline --workdir /tmp/sajax-demo
"""

from pathlib import Path

import ml_collections

from sajax.config_files import load_config

HERE = Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.sim = load_config(HERE / "sim_tiny.py")  # the society (questions_file: the pool the pipeline splits)
    config.sim.rounds = 3
    config.dataset = ml_collections.ConfigDict(dict(ratios="5,1,1", validation_percent=20, seed=0))
    config.train = load_config(HERE / "tiny.py")  # the policy; data.path is the pipeline's dataset
    config.train.train.steps = 150
    # The re-simulated society's revise prompts (question, the draft and four peers' reasons, each up to its token
    # limit) reach ~560 demo-tokenizer tokens before 48 new ones: a context of 1,024 (RoPE: no weights change).
    config.train.model.max_position_embeddings = 1024
    # With --config.train.lora.rank > 0: the tiny model is random, so its frozen output layer maps any hidden state
    # to a near-uniform next token (logits ~±0.5), and a rank-r update of it moves the logits in r directions only:
    # the output layer trains in full beside the adapters (PEFT's modules_to_save), or the model cannot answer.
    config.train.lora.modules_to_save = "lm_head$"
    config.train.eval_every = 0
    config.objectives = ("stable_alignment", "sft")  # from sim.pipeline.OBJECTIVES; same data, steps and lr
    config.eval = ml_collections.ConfigDict(dict(
        evals=("alignment", "hhh_adversarial", "multiple_choice", "are_you_sure"),
        judge="observer",  # observer: the society's observers (1-7); or a model, 1-10: a HF folder, .gguf, known name,
        # or an OpenAI-compatible server's base URL (http://host:port/v1)
        judge_model="", judge_api_key_env="",  # a served judge: the served model's name; the key's variable
        judge_readout="yes_no",  # a model judge: yes_no | digits (sajax.evals.judge; a served one: yes_no)
        heldout_fraction=0.25,  # of the questions, never asked in the society, for the `alignment` evaluation
        data="",  # multiple-choice questions (BIG-bench JSON or HH-RLHF JSONL); "" = the built-in set
        limit=32,  # first N multiple-choice questions (0: all)
        max_new_tokens=32, batch_size=16))
    config.resim_rounds = 1  # rounds of the society re-run with the trained model as every agent
    return config
