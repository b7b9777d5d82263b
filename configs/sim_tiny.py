"""SANDBOX on CPU: a 3×3 society of scripted agents for 2 rounds (seconds). Switch `backend.kind` to `local`
(the sajax LLaMA: a random tiny one, or `backend.model_dir`) or `openai` (any OpenAI-compatible server)."""

import ml_collections


def _backend(kind: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        kind=kind,  # scripted | local | openai
        model_dir="",  # local: HF folder, .gguf file or known name; "" = a random tiny model (demo tokenizer)
        rating_readout="auto",  # local, alignment: digits | yes_no | generate; auto: yes_no with a chat template;
        # openai, both aspects: logprobs | structured | text; auto: the first the server supports (probed at start)
        engagement_readout="auto",  # local, engagement: the same choices; auto: digits (see sajax-calibrate)
        rating_mode="expected",  # local: expected value or argmax of the read distribution
        batch_size=8,  # local: rows per jitted call (small on CPU, where big batches spill the caches)
        base_url="http://127.0.0.1:8000/v1", model="", api_key_env="",  # openai: key read from this env var
        temperature=0.7, top_p=0.95, max_new_tokens=48, reason_tokens=32,
        revision_tokens=0,  # revisions' limit (they restate the draft and add to it); 0 = max_new_tokens
        concurrency=8, timeout=60.0, max_retries=5,
        max_missing_fraction=0.5))  # a stage with more of its outputs missing stops the round (not committed)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.world_id = 0
    config.rounds = 2
    config.questions_file = ""  # text (one question per line) or JSONL with "question"; "" = built-in set
    config.prior_file = ""  # JSONL {question, answer, label} seeding each agent's memory by its label
    config.prior_per_agent = 2
    config.world = ml_collections.ConfigDict(dict(
        grid_size=3, initial_setting="half_half", radius=-1.0,  # radius -1: grid_size // 2
        interaction="local_and_global", dropout=0.0, tgt_agent_count=4, num_observers=1))
    config.memory = ml_collections.ConfigDict(dict(top_k=1, threshold=0.3, scann_min_size=4096))
    config.embedder = ml_collections.ConfigDict(dict(kind="hashing", dim=256, base_url="", model="",
                                                     api_key_env=""))  # hashing | local | openai
    config.backend = _backend("scripted")
    config.observer_backend = _backend("scripted")
    return config
