"""Building a society from a config and running its rounds with crash-safe commits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sajax import fileutil
from sajax.formats import loading
from sim import engine, report, store, world
from sim.backends import ScriptedBackend
from sim.embedders import HashingEmbedder, LocalModelEmbedder, OpenAIEmbedder
from sim.memory import Memory
from sim.openai_backend import OpenAIBackend, OpenAIClient, check_server

QUESTIONS = Path(__file__).with_name("assets") / "questions.txt"


def read_questions(path: str) -> list[str]:
    """One question per line, or JSONL with a "question" field; '' = the built-in set. Errors name the file and
    the line."""
    file = Path(path) if path else QUESTIONS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: questions_file not found")
    if file.suffix == ".jsonl":
        questions = []
        for n, row in fileutil.read_jsonl(file):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise ValueError(f"{file} line {n}: expected a JSON object with a 'question' field (a string)")
            questions.append(row["question"].strip())
    else:
        questions = [line.strip() for line in fileutil.read_text(file).splitlines() if line.strip()]
    if not questions or not all(questions):
        raise ValueError(f"{file}: no questions (or an empty one)")
    return questions


def read_prior(path: str) -> dict[str, list[tuple[str, str]]]:
    """Seed memories by label: ours — JSONL {question, answer, label} — or the original project's
    `labeled_prior.jsonl` — one JSON array of {question, response, morality_label} (told apart by the content,
    whatever the file's name). Labels are 'good' or 'bad'; the original's rows with other labels are never
    sampled there, so they are skipped here, while in our format another label is an error."""
    prior: dict[str, list[tuple[str, str]]] = {"good": [], "bad": []}
    if not path:
        return prior
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: prior_file not found")
    for where, row in fileutil.read_json_records(path):
        original = "morality_label" in row
        question, answer = row.get("question"), row.get("response" if original else "answer")
        label = row.get("morality_label" if original else "label")
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
            raise ValueError(f"{where}: expected {{question, answer, label}} or the original's {{question, response, "
                             "morality_label}} with text fields")
        if label not in prior:
            if original:
                continue
            raise ValueError(f"{where}: label must be 'good' or 'bad', got {label!r}")
        prior[label].append((question, answer))
    return prior


def world_config(cfg) -> world.WorldConfig:
    w = cfg.world
    return world.WorldConfig(grid_size=w.grid_size, initial_setting=w.initial_setting,
                             radius=None if w.radius < 0 else w.radius, interaction=w.interaction,
                             dropout=w.dropout, tgt_agent_count=w.tgt_agent_count, num_observers=w.num_observers)


class LocalModels:
    """Loads each local model once (a backend and the embedder may share it); writes nothing."""

    def __init__(self, seed: int):
        self.seed, self._cache = seed, {}

    def get(self, model_dir: str):
        if model_dir not in self._cache:
            from sajax.config_files import DEFAULT_CONFIG, load_config

            tiny = load_config(DEFAULT_CONFIG)  # the random model's size, when there is no model_dir
            tiny.seed = self.seed
            tiny.model.scan_layers = True  # one scanned layer: a deep model compiles each new shape ~2× faster
            self._cache[model_dir] = loading.load_model_and_tokenizer(tiny, model_dir)
        return self._cache[model_dir]


BACKEND_KINDS = ("scripted", "local", "openai")


def make_backend(b, models: LocalModels, name: str):
    """The backend of config section `name` (`backend` or `observer_backend`); ValueError naming the field for a
    bad setting."""
    if b.kind not in BACKEND_KINDS:
        raise ValueError(f"{name}.kind must be one of {BACKEND_KINDS}, got {b.kind!r}")
    if not 0.0 <= b.max_missing_fraction <= 1.0:
        raise ValueError(f"{name}.max_missing_fraction must be in [0, 1], got {b.max_missing_fraction}")
    if b.kind == "scripted":
        return ScriptedBackend(max_missing_fraction=b.max_missing_fraction)
    if b.kind == "local":
        from sim.local_backend import LocalBackend

        config, params, tok = models.get(b.model_dir)
        return LocalBackend(config, params, tok, max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                            top_p=b.top_p, reason_tokens=b.reason_tokens, revision_tokens=b.revision_tokens,
                            rating_mode=b.rating_mode,
                            rating_readout=b.rating_readout, engagement_readout=b.engagement_readout,
                            batch_size=b.batch_size,
                            name=f"local:{b.model_dir or 'random-tiny'}", max_missing_fraction=b.max_missing_fraction)
    if not b.model:
        raise ValueError(f"{name}.model must name the served model for kind 'openai'")
    client = OpenAIClient(b.base_url, b.api_key_env, timeout=b.timeout, max_retries=b.max_retries)
    return OpenAIBackend(client, b.model, temperature=b.temperature, max_tokens=b.max_new_tokens,
                         reason_tokens=b.reason_tokens, revision_tokens=b.revision_tokens, readout=b.rating_readout,
                         concurrency=b.concurrency,
                         max_missing_fraction=b.max_missing_fraction, setting=name)


def make_embedder(e, models: LocalModels, backend_cfg):
    if e.kind == "hashing":
        return HashingEmbedder(e.dim)
    if e.kind == "local":
        config, params, tok = models.get(backend_cfg.model_dir)
        return LocalModelEmbedder(config, params, tok)
    if e.kind == "openai":  # where the backend's settings are the defaults: its server, model, key, limits
        model = e.model or (backend_cfg.model if backend_cfg.kind == "openai" else "")
        if not model:
            raise ValueError("embedder.model must name the served embedding model for kind 'openai'")
        base_url = e.base_url or backend_cfg.base_url
        client = OpenAIClient(base_url, e.api_key_env or backend_cfg.api_key_env, timeout=backend_cfg.timeout,
                              max_retries=backend_cfg.max_retries)
        check_server(client, model, "embedder.model")
        return OpenAIEmbedder(client, model)
    raise ValueError(f"embedder.kind must be 'hashing', 'local' or 'openai', got {e.kind!r}")


def new_agents(cfg, wc: world.WorldConfig, rng: np.random.Generator, embedder,
               prior: dict[str, list[tuple[str, str]]]) -> list[engine.Agent]:
    labels = world.initial_labels(wc, rng)
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
    """Runs rounds until `cfg.rounds` are committed; returns every round's metrics. Every check — world,
    questions, prior, backends (reachable), the workdir and what a resume reads — comes before the first write:
    a start that fails leaves the workdir as it was."""
    workdir = Path(workdir).absolute()
    wc = world_config(cfg)
    wc.validate()
    questions = read_questions(cfg.questions_file)
    prior = read_prior(cfg.prior_file)
    models = LocalModels(cfg.seed)
    backend = make_backend(cfg.backend, models, "backend")
    observer = make_backend(cfg.observer_backend, models, "observer_backend")
    embedder = make_embedder(cfg.embedder, models, cfg.backend)
    for b in {id(b): b for b in (backend, observer)}.values():
        b.check()
    config_json = json.loads(cfg.to_json())
    done = store.check(workdir, config_json, resume=resume, overwrite=overwrite)
    rng = np.random.default_rng(cfg.seed)
    if done:
        for n in store.committed_rounds(workdir):
            store.read_round_records(workdir, n, expected=wc.num_agents)
        agents, rng_state = store.load_state(workdir, done)
        rng.bit_generator.state = rng_state
    else:
        agents = new_agents(cfg, wc, rng, embedder, prior)  # embeds the prior: a failing embedder stops here
    store.prepare(workdir, config_json, overwrite=overwrite)
    society = engine.Society(wc, engine.MemoryConfig(**cfg.memory), agents, rng, embedder, cfg.seed,
                             cfg.world_id, embedder_name=cfg.embedder.kind)
    with tqdm(total=cfg.rounds, initial=done, desc="rounds", unit="round") as bar:
        for round_index in range(done + 1, cfg.rounds + 1):
            journal = store.open_journal(workdir, round_index)
            for part in (backend, observer, embedder):
                if hasattr(part, "journal"):  # backends, and an embedder on a server
                    part.journal = journal
            try:
                records, metrics = engine.run_round(society, round_index, questions, backend, observer,
                                                    wc.num_observers, progress=bar)
            finally:
                journal.close()
            metrics["journal"] = {"replayed": journal.replayed, "sent": journal.recorded}
            store.commit_round(workdir, round_index, records, metrics, society.agents, rng.bit_generator.state)
            bar.update(1)
    all_metrics = store.read_metrics(workdir)
    report.write(workdir, all_metrics)
    return all_metrics
