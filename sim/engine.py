"""One Back-Scatter round for the whole society, each stage one batched backend call.

Round r: every agent gets a fresh question, then
  1. draft     — all agents answer (with their most similar remembered Q/A, if close enough);
  2. feedback  — every (agent, peer) pair: the peer rates the draft 1–7 and says why;
  3. revise    — all agents see the average rating and the reasons (lowest last) and revise; the revision
                 goes into the agent's memory;
  4. observe   — memory-less observers rate alignment and engagement of every draft and revision.
All randomness comes from the society's one generator (questions, peers) and from per-stage seeds derived
from (seed, round, stage), so a round recomputed after a crash is identical.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from sim import prompts, world
from sim.backends import Backend, Rating, Request
from sim.memory import Memory, share_within

STAGES = ("draft", "feedback", "revise", "observe_alignment", "observe_engagement")

class StageFailure(RuntimeError):
    """A stage got no usable output for too many of its requests; its round is not committed."""


def check_stage(round_index: int, stage: str, backend: Backend, missing: int, total: int) -> None:
    """StageFailure when every request of the stage, or more than the backend's `max_missing_fraction` of them,
    gave no usable output (a failed request, an empty text, a rating that cannot be read)."""
    if total and (missing == total or missing > backend.max_missing_fraction * total):
        last = f"; last error: {backend.last_error}" if backend.last_error else ""
        share = ("all of them" if missing == total
                 else f"more than max_missing_fraction {backend.max_missing_fraction:g}")
        raise StageFailure(f"round {round_index}, stage {stage}: {missing} of {total} requests to "
                           f"{backend.describe()} gave no usable output ({share}){last}. Round {round_index} was "
                           "not committed; fix the backend and run again with --resume")


@dataclasses.dataclass
class Agent:
    index: int
    label: str
    location: tuple[int, int]
    memory: Memory


@dataclasses.dataclass
class MemoryConfig:
    top_k: int = 1
    threshold: float = 0.3
    scann_min_size: int = 4096


# more than this share of pairs of different questions within memory.threshold: the embedder cannot tell them apart
UNINFORMATIVE_SHARE = 0.9


class Society:
    def __init__(self, world_config: world.WorldConfig, memory_config: MemoryConfig, agents: list[Agent],
                 rng: np.random.Generator, embedder, seed: int, world_id: int = 0, embedder_name: str = "embedder"):
        self.world, self.memory_config, self.agents, self.rng = world_config, memory_config, agents, rng
        self.embedder, self.seed, self.world_id, self.embedder_name = embedder, seed, world_id, embedder_name
        self.circles = world.social_circles(world_config)
        self.similarities_checked = False

    def check_similarities(self, questions: list[str], vectors: np.ndarray) -> float | None:
        """Once per run, on the first round's questions: the share of pairs of different questions within
        memory.threshold (`sim.memory.share_within`); above UNINFORMATIVE_SHARE a warning on stderr says that recall
        will bring back unrelated questions and how to fix it."""
        if self.similarities_checked:
            return None
        self.similarities_checked = True
        distinct = {q: v for q, v in zip(questions, vectors)}
        share = share_within(np.stack(list(distinct.values())), self.memory_config.threshold)
        if len(distinct) > 2 and share > UNINFORMATIVE_SHARE:
            sys.stderr.write(f"warning: the embedder ({self.embedder_name}) puts {share:.0%} of the pairs of "
                             f"{len(distinct)} different questions within memory.threshold "
                             f"{self.memory_config.threshold:g} (cosine distance): agents will recall unrelated "
                             "questions. Use an embedding model (embedder.model), the 'hashing' embedder, or a "
                             "smaller memory.threshold\n")
        return share

    def stage_seed(self, round_index: int, stage: str) -> int:
        return int(np.random.SeedSequence([self.seed, round_index, STAGES.index(stage)]).generate_state(1)[0])

    def recall(self, agent: Agent, embedding: np.ndarray) -> list[tuple[str, str]]:
        c = self.memory_config
        return agent.memory.recall(embedding, c.top_k, c.threshold, c.scann_min_size)


def _answers(outputs: list[str | None]) -> tuple[list[str | None], int]:
    """(answers, how many were cut): each generated text up to the prompts' scaffolding (`prompts.answer_text`),
    an empty one counted as missing (None)."""
    answers = [prompts.answer_text(text) for text in outputs]
    cut = sum(text is not None and answer != text.strip() for text, answer in zip(outputs, answers))
    return answers, cut


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def run_round(society: Society, round_index: int, questions: list[str], backend: Backend,
              observer_backend: Backend, num_observers: int, progress=None) -> tuple[list[dict], dict]:
    """Runs round `round_index` (1-based) and returns (one record per agent, round metrics)."""
    start = time.perf_counter()
    before = {id(b): {s: dataclasses.replace(v) for s, v in b.stats.items()} for b in (backend, observer_backend)}
    agents = society.agents
    asked = [questions[i] for i in society.rng.choice(len(questions), size=len(agents),
                                                     replace=len(questions) < len(agents))]
    question_vectors = society.embedder.embed(asked)
    society.check_similarities(asked, question_vectors)
    peers = [world.select_peers(society.world, a.index, society.circles[a.index], society.rng) for a in agents]

    def step(name):
        if progress is not None:
            progress.set_postfix_str(f"round {round_index}: {name}")

    step("draft")
    drafts, cut = _answers(backend.generate([
        Request(prompts.draft(q, society.recall(a, v[None])), q, label=a.label, stage="draft")
        for a, q, v in zip(agents, asked, question_vectors)], society.stage_seed(round_index, "draft")))
    check_stage(round_index, "draft", backend, drafts.count(None), len(drafts))

    step("feedback")
    pairs = [(i, p) for i, a in enumerate(agents) if drafts[i] is not None for p in peers[i]]
    feedback = backend.rate([
        Request(prompts.feedback(asked[i], drafts[i], society.recall(agents[p], question_vectors[i][None]),
                                 backend.rating_readout),
                asked[i], drafts[i], label=agents[p].label, stage="feedback") for i, p in pairs],
        society.stage_seed(round_index, "feedback")) if pairs else []
    check_stage(round_index, "feedback", backend, sum(r.value is None for r in feedback), len(feedback))
    per_agent: dict[int, list[tuple[int, Rating]]] = {i: [] for i in range(len(agents))}
    for (i, p), rating in zip(pairs, feedback):
        per_agent[i].append((p, rating))

    step("revise")
    to_revise = [i for i in range(len(agents)) if drafts[i] is not None]
    averages = {i: _mean([r.value for _, r in per_agent[i]]) for i in to_revise}
    revised_list, revisions_cut = _answers(backend.generate([
        Request(prompts.revise(asked[i], drafts[i], averages[i],
                               [(r.value, r.reason or "(no reason given)") for _, r in per_agent[i]]),
                asked[i], drafts[i], label=agents[i].label, stage="revise") for i in to_revise],
        society.stage_seed(round_index, "revise"))) if to_revise else ([], 0)
    cut += revisions_cut
    check_stage(round_index, "revise", backend, revised_list.count(None), len(revised_list))
    revised = dict(zip(to_revise, revised_list))
    for i in to_revise:
        final = revised[i] if revised[i] is not None else drafts[i]
        agents[i].memory.add(asked[i], final, question_vectors[i])

    observed = {}
    for kind, build in (("alignment", prompts.observe_alignment), ("engagement", prompts.observe_engagement)):
        step(f"observe {kind}")
        targets = [(i, when, text) for i in to_revise
                   for when, text in (("before", drafts[i]), ("after", revised[i])) if text is not None]
        readout = observer_backend.rating_readout if kind == "alignment" else observer_backend.engagement_readout
        requests = [Request(build(asked[i], text, readout), asked[i], text, stage=f"observe_{kind}")
                    for i, _, text in targets for _ in range(num_observers)]
        ratings = observer_backend.rate(requests, society.stage_seed(round_index, f"observe_{kind}")) \
            if requests else []
        check_stage(round_index, f"observe_{kind}", observer_backend, sum(r.value is None for r in ratings),
                    len(ratings))
        for n, (i, when, _) in enumerate(targets):
            observed[(i, kind, when)] = ratings[n * num_observers:(n + 1) * num_observers]

    records = []
    for i, agent in enumerate(agents):
        record = {"world_id": society.world_id, "round": round_index, "agent": agent.index, "label": agent.label,
                  "location": list(agent.location), "question": asked[i], "draft_answer": drafts[i],
                  "feedback": [{"agent": p, "rating": r.value, "reason": r.reason} for p, r in per_agent[i]],
                  "rating": averages.get(i), "revised_answer": revised.get(i),
                  "model": backend.name}
        for kind, key in (("alignment", "moral"), ("engagement", "engagement")):
            for when in ("before", "after"):
                found = observed.get((i, kind, when), [])
                record[f"gen_{key}_score_{when}"] = _mean([r.value for r in found])
                record[f"gen_{key}_reasons_{when}"] = [r.reason for r in found]
        records.append(record)
    metrics = round_metrics(records, before, (backend, observer_backend), time.perf_counter() - start)
    metrics["answers_cut_at_scaffolding"] = cut
    return records, metrics


def round_metrics(records: list[dict], stats_before: dict, backends, seconds: float) -> dict:
    def stats(key):
        values = np.array([r[key] for r in records if r[key] is not None], np.float64)
        return {"mean": float(values.mean()) if len(values) else None,
                "median": float(np.median(values)) if len(values) else None,
                "missing": int(sum(r[key] is None for r in records))}

    metrics = {"round": records[0]["round"], "seconds": seconds,
               "alignment_before": stats("gen_moral_score_before"), "alignment_after": stats("gen_moral_score_after"),
               "engagement_before": stats("gen_engagement_score_before"),
               "engagement_after": stats("gen_engagement_score_after"),
               "missing_feedback_ratings": int(sum(f["rating"] is None for r in records for f in r["feedback"])),
               "missing_drafts": int(sum(r["draft_answer"] is None for r in records)),
               "missing_revisions": int(sum(r["revised_answer"] is None for r in records
                                            if r["draft_answer"] is not None)),
               "changed_revisions": int(sum(r["revised_answer"] is not None and r["revised_answer"] != r["draft_answer"]
                                            for r in records)),
               "stages": {}}
    for backend in {id(b): b for b in backends}.values():
        for stage, now in backend.stats.items():
            was = stats_before[id(backend)].get(stage)
            metrics["stages"][stage] = {f: getattr(now, f) - (getattr(was, f) if was else 0)
                                        for f in ("calls", "prompt_tokens", "completion_tokens")}
    return metrics
