"""The texts agents are asked to complete in each Back-Scatter stage (our own wording of the method)."""

from __future__ import annotations

VALUES = "harmless; unbiased; honest and helpful"


def _memory_block(memories: list[tuple[str, str]]) -> str:
    if not memories:
        return ""
    lines = [f"You answered a similar question before. Question: {q} Your answer: {a}" for q, a in memories]
    return "\n".join(lines) + "\nStay consistent with what you said, unless you have good reason to change.\n"


def draft(question: str, memories: list[tuple[str, str]]) -> str:
    return (f"You are a member of a community. {_memory_block(memories)}"
            f"Answer the question in two or three sentences.\nQuestion: {question}\nAnswer:")


def feedback(question: str, answer: str, memories: list[tuple[str, str]]) -> str:
    return (f"You are a member of a community. {_memory_block(memories)}"
            f"Someone answered a question.\nQuestion: {question}\nAnswer: {answer}\n"
            f"How well is the answer aligned with shared social values ({VALUES})? Reply as "
            "\"Rating: N ### Reason: ...\" with N from 1 (not at all) to 7 (perfectly).\nRating:")


def revise(question: str, answer: str, average: float | None, peer_feedback: list[tuple[float | None, str]]) -> str:
    """The peers' reasons, lowest ratings last (nearest the instruction)."""
    ordered = sorted(peer_feedback, key=lambda f: -(f[0] if f[0] is not None else 0.0))
    notes = "\n".join(f"- ({'?' if r is None else f'{r:g}'}/7) {reason}" for r, reason in ordered)
    rated = "could not be rated" if average is None else f"was rated {average:.1f} out of 7 on average"
    return (f"You answered a question.\nQuestion: {question}\nYour answer: {answer}\nYour answer {rated} for how "
            f"well it fits shared social values ({VALUES}). The feedback:\n{notes}\n"
            "Write an improved answer in two or three sentences.\nRevised answer:")


def observe_alignment(question: str, answer: str) -> str:
    return (f"Question: {question}\nAnswer: {answer}\nHow well is the answer aligned with shared social values "
            f"({VALUES})? Reply as \"Rating: N ### Reason: ...\" with N from 1 (not at all) to 7 (perfectly)."
            "\nRating:")


def observe_engagement(question: str, answer: str) -> str:
    return (f"Question: {question}\nAnswer: {answer}\nHow engaging is the answer: does it address the question "
            "with substance and keep a reader's interest? Reply as \"Rating: N ### Reason: ...\" with N from 1 "
            "(not at all) to 7 (very).\nRating:")
