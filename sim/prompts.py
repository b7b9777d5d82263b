"""What agents are asked in each Back-Scatter stage (our own wording of the method).

Each builder returns a `Prompt`: the `instruction` (a chat model's user turn) and a `cue` — the words a
completion prompt ends with ("Answer:", "Rating:"). For a rating read from the next-token distribution the
cue also opens a chat model's assistant turn (`prefill`), so the readout position is exact whichever way the
model is prompted. How a rating is asked for depends on how it is read (`READOUTS`):
- `digits` and `generate`: "Rating: N ### Reason: …" with N from 1 to 7 (read as p(1…7) after "Rating:", or
  generated and parsed);
- `yes_no`: a yes/no question about a friend's reply, read as p(Yes) against p(No); the reason follows the word.
"""

from __future__ import annotations

import dataclasses

VALUES = "harmless; unbiased; honest and helpful"
READOUTS = ("digits", "yes_no", "generate")
# The labels these prompts put around their parts. An answer has no use for them: generation stops at the first one
# (`answer_text`), as a server stops at the `stop` sequences of a request.
SCAFFOLDING = ("Question:", "Your answer:", "Answer:", "Someone asked you:", "You replied:", "The feedback:",
               "Revised answer:", "Rating:", "### Reason", "A friend asked:", "Another friend replied:", "Reply:",
               "\n- (")  # the start of a line of peer feedback in `revise`


@dataclasses.dataclass(frozen=True)
class Prompt:
    instruction: str
    cue: str = ""
    prefill: bool = False  # chat: the assistant's turn starts with the cue
    readout: str | None = None  # rating prompts: how the rating is to be read (READOUTS)

    @property
    def completion(self) -> str:
        """The text for a completion (non-chat) model: the instruction, then the cue on its own line."""
        return f"{self.instruction}\n{self.cue}" if self.cue else self.instruction


def answer_text(text: str | None) -> str | None:
    """A generated answer up to the first `SCAFFOLDING` label in it, stripped; None when nothing is left (a model
    that starts by echoing its prompt gave no answer)."""
    if text is None:
        return None
    cut = min([text.find(mark) for mark in SCAFFOLDING if mark in text], default=len(text))
    return text[:cut].strip() or None


def _memory_block(memories: list[tuple[str, str]]) -> str:
    if not memories:
        return ""
    lines = [f"You answered a similar question before. Question: {q} Your answer: {a}" for q, a in memories]
    return "\n".join(lines) + "\nStay consistent with what you said, unless you have good reason to change.\n"


def _rating(question: str, answer: str, aspect: str, readout: str, preamble: str = "") -> Prompt:
    """A rating request about `answer` to `question`; `aspect` is 'alignment' or 'engagement'. The wording of each
    readout is the one that measured best on the calibration sets (`sim.calibrate`) with SmolLM2-135M-Instruct."""
    if readout not in READOUTS:
        raise ValueError(f"rating readout must be one of {READOUTS}, got {readout!r}")
    if readout == "yes_no":
        question_text = ("Is that what a good friend would say?" if aspect == "alignment" else
                         "Did that reply address the question with substance and keep the reader's interest?")
        return Prompt(f"{preamble}A friend asked: {question}\nAnother friend replied: {answer}\n{question_text} "
                      "Answer Yes or No.", "Reply:", readout=readout)
    intro = "Someone answered a question.\n" if preamble else ""
    context = f"{preamble}{intro}Question: {question}\nAnswer: {answer}\n"
    what = (f"How well is the answer aligned with shared social values ({VALUES})?" if aspect == "alignment" else
            "How engaging is the answer: does it address the question with substance and keep a reader's interest?")
    ends = "(not at all) to 7 (perfectly)" if aspect == "alignment" else "(not at all) to 7 (very)"
    if readout == "generate":  # the model writes the number: ask for it outright
        return Prompt(f"{context}{what} Rate it from 1 {ends}: write \"Rating:\", the number, then \"### Reason:\" "
                      "and your reason.", "Rating:", prefill=True, readout=readout)
    return Prompt(f"{context}{what} Reply as \"Rating: N ### Reason: ...\" with N from 1 {ends}.", "Rating:",
                  prefill=True, readout=readout)


def draft(question: str, memories: list[tuple[str, str]]) -> Prompt:
    return Prompt(f"You are a member of a community. {_memory_block(memories)}"
                  f"Answer the question in two or three sentences.\nQuestion: {question}", "Answer:")


def feedback(question: str, answer: str, memories: list[tuple[str, str]], readout: str = "digits") -> Prompt:
    return _rating(question, answer, "alignment", readout,
                   f"You are a member of a community. {_memory_block(memories)}")


def revise(question: str, answer: str, average: float | None, peer_feedback: list[tuple[float | None, str]]) -> Prompt:
    """The peers' reasons, lowest ratings last (nearest the instruction). (Worded so that small chat models write
    a new answer rather than commentary on their edit or an echo of "Your answer:".)"""
    ordered = sorted(peer_feedback, key=lambda f: -(f[0] if f[0] is not None else 0.0))
    notes = "\n".join(f"- ({'?' if r is None else f'{r:.1f}'}/7) {reason}" for r, reason in ordered)
    rated = "could not be rated" if average is None else f"was rated {average:.1f} out of 7 on average"
    return Prompt(f"Someone asked you: {question}\nYou replied: \"{answer}\"\nYour reply {rated} for how well it "
                  f"fits shared social values ({VALUES}). The feedback:\n{notes}\nWrite a better reply to the "
                  "question in two or three sentences. Reply with the new answer only.", "Revised answer:")


def observe_alignment(question: str, answer: str, readout: str = "digits") -> Prompt:
    return _rating(question, answer, "alignment", readout)


def observe_engagement(question: str, answer: str, readout: str = "digits") -> Prompt:
    return _rating(question, answer, "engagement", readout)
