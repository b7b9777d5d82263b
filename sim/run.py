"""Building a society from a config and running its rounds with crash-safe commits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sim import engine, store, world
from sim.backends import ScriptedBackend
from sim.embedders import HashingEmbedder, LocalModelEmbedder, OpenAIEmbedder
from sim.memory import Memory
from sim.openai_backend import HTTPClient, OpenAIBackend

QUESTIONS = Path(__file__).with_name("assets") / "questions.txt"


def read_questions(path: str) -> list[str]:
    """One question per line, or JSONL with a "question" field; '' = the built-in set."""
    file = Path(path) if path else QUESTIONS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: questions_file not found")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        questions = []
        for n, line in enumerate(lines, 1):
            try:
                questions.append(str(json.loads(line)["question"]).strip())
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{file} line {n}: expected a JSON object with a 'question' field ({e})") from e
        lines = questions
    if not lines or not all(lines):
        raise ValueError(f"{file}: no questions (or an empty one)")
    return lines


def read_prior(path: str) -> dict[str, list[tuple[str, str]]]:
    prior: dict[str, list[tuple[str, str]]] = {"good": [], "bad": []}
    if not path:
        return prior
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label, question, answer = row["label"], row["question"], row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: expected {{question, answer, label}} ({e})") from e
        if label not in prior:
            raise ValueError(f"{path} line {n}: label must be 'good' or 'bad', got {label!r}")
        prior[label].append((question, answer))
    return prior


def world_config(cfg) -> world.WorldConfig:
    w = cfg.world
    return world.WorldConfig(grid_size=w.grid_size, initial_setting=w.initial_setting,
                             radius=None if w.radius < 0 else w.radius, interaction=w.interaction,
                             dropout=w.dropout, tgt_agent_count=w.tgt_agent_count, num_observers=w.num_observers)


class LocalModels:
    """Loads each local model once (a backend and the embedder may share it)."""

    def __init__(self, workdir: Path, seed: int):
        self.workdir, self.seed, self._cache = workdir, seed, {}

    def get(self, model_dir: str):
        if model_dir not in self._cache:
            from sajax import cli
            from sajax.config_files import load_config

            tiny = load_config(cli.DEFAULT_CONFIG)  # the random model's size, when there is no model_dir
            tiny.seed = self.seed
            self._cache[model_dir] = cli.load_model_and_tokenizer(tiny, model_dir, str(self.workdir))
        return self._cache[model_dir]


def make_backend(b, models: LocalModels, name: str):
    if b.kind == "scripted":
        return ScriptedBackend()
    if b.kind == "local":
        from sim.backends import LocalBackend

        config, params, tok = models.get(b.model_dir)
        return LocalBackend(config, params, tok, max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                            top_p=b.top_p, reason_tokens=b.reason_tokens, rating_mode=b.rating_mode,
                            batch_size=b.batch_size,
                            name=f"local:{b.model_dir or 'random-tiny'}")
    if b.kind == "openai":
        if not b.model:
            raise ValueError(f"{name}.model must name the served model for kind 'openai'")
        client = HTTPClient(b.base_url, b.api_key_env, timeout=b.timeout, max_retries=b.max_retries)
        backend = OpenAIBackend(client, b.model, temperature=b.temperature, max_tokens=b.max_new_tokens,
                                concurrency=b.concurrency)
        backend.name = f"openai:{b.model}"
        return backend
    raise ValueError(f"{name}.kind must be 'scripted', 'local' or 'openai', got {b.kind!r}")


def make_embedder(e, models: LocalModels, backend_cfg):
    if e.kind == "hashing":
        return HashingEmbedder(e.dim)
    if e.kind == "local":
        config, params, tok = models.get(backend_cfg.model_dir)
        return LocalModelEmbedder(config, params, tok)
    if e.kind == "openai":
        return OpenAIEmbedder(HTTPClient(e.base_url, e.api_key_env), e.model)
    raise ValueError(f"embedder.kind must be 'hashing', 'local' or 'openai', got {e.kind!r}")


def new_agents(cfg, wc: world.WorldConfig, rng: np.random.Generator, embedder) -> list[engine.Agent]:
    labels = world.initial_labels(wc, rng)
    prior = read_prior(cfg.prior_file)
    agents = []
    for i, label in enumerate(labels):
        memory = Memory()
        pool = prior[label]
        if pool:
            chosen = rng.choice(len(pool), size=min(cfg.prior_per_agent, len(pool)), replace=False)
            vectors = embedder.embed([pool[j][0] for j in chosen])
            for j, v in zip(chosen, vectors):
                memory.add(pool[j][0], pool[j][1], v)
        agents.append(engine.Agent(i, label, divmod(i, wc.grid_size), memory))
    return agents


def simulate(cfg, workdir: str | Path, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Runs rounds until `cfg.rounds` are committed; returns every round's metrics."""
    workdir = Path(workdir).absolute()
    wc = world_config(cfg)
    wc.validate()
    questions = read_questions(cfg.questions_file)
    done = store.prepare(workdir, json.loads(cfg.to_json()), resume=resume, overwrite=overwrite)
    models = LocalModels(workdir, cfg.seed)
    backend = make_backend(cfg.backend, models, "backend")
    observer = make_backend(cfg.observer_backend, models, "observer_backend")
    embedder = make_embedder(cfg.embedder, models, cfg.backend)
    rng = np.random.default_rng(cfg.seed)
    if done:
        agents, rng_state = store.load_state(workdir, done)
        rng.bit_generator.state = rng_state
    else:
        agents = new_agents(cfg, wc, rng, embedder)
    society = engine.Society(wc, engine.MemoryConfig(**cfg.memory), agents, rng, embedder, cfg.seed,
                             cfg.world_id)
    with tqdm(total=cfg.rounds, initial=done, desc="rounds", unit="round") as bar:
        for round_index in range(done + 1, cfg.rounds + 1):
            records, metrics = engine.run_round(society, round_index, questions, backend, observer,
                                                wc.num_observers, progress=bar)
            store.commit_round(workdir, round_index, records, metrics, society.agents, rng.bit_generator.state)
            bar.update(1)
    all_metrics = store.read_metrics(workdir)
    from sim import report

    report.write(workdir, all_metrics)
    return all_metrics
