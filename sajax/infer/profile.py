"""Where inference time goes: model calls (prefill, extend, decode, scoring, embedding) and XLA compiles.

Off unless a `Recorder` is active (`with Recorder() as rec:`): then each model call in `sajax.infer.generate`
waits for its result and is recorded as a `Call` — its seconds, the compiles inside them (tracing, lowering and
XLA's compile of a new shape, timed through `jax.monitoring`), its real and padded tokens, rows and decode steps —
under the recorder's current `label` (a simulator stage, say). Time outside model calls — tokenization, Python,
host↔device copies — is what the caller's wall clock has left. Used by `bench/sim_throughput.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass
class Call:
    label: str
    kind: str  # prefill | extend | decode | score | embed
    rows: int
    tokens: int = 0  # real tokens run through the model (decode: tokens generated)
    padded_tokens: int = 0  # token slots computed, padding included (decode: rows × steps)
    steps: int = 1  # sequential model steps (decode: the longest row's new tokens)
    seconds: float = 0.0  # wall time, compiles included
    compile_seconds: float = 0.0
    compiles: int = 0


_active: Recorder | None = None


class Recorder:
    """`calls`: the model calls made while it is active; `outside`: compile seconds outside any call, by label."""

    def __init__(self):
        self.calls: list[Call] = []
        self.outside: dict[str, float] = {}
        self.label = ""
        self.current: Call | None = None

    def __enter__(self) -> Recorder:
        global _active
        if _active is not None:
            raise RuntimeError("a profile.Recorder is already active")
        _active = self
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        global _active
        _active = None
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event not in COMPILE_EVENTS:
            return
        if self.current is None:
            self.outside[self.label] = self.outside.get(self.label, 0.0) + duration
        else:
            self.current.compile_seconds += duration
            self.current.compiles += event == COMPILE_EVENTS[-1]

    @contextlib.contextmanager
    def labelled(self, label: str):
        """Calls inside are recorded under `label`."""
        before, self.label = self.label, label
        try:
            yield
        finally:
            self.label = before


def active() -> Recorder | None:
    """The recorder now recording, if any."""
    return _active


@contextlib.contextmanager
def call(kind: str, rows: int, tokens: int = 0, padded_tokens: int = 0):
    """Records one model call under the active recorder's label (a no-op without one). The body stores what it
    computed as `record.result` on the yielded record (its time runs until that is ready on device) and may fill
    in counts known only at the end (decode's tokens and steps)."""
    record = Call("", kind, rows, tokens, padded_tokens)
    recorder = _active
    if recorder is None:
        yield record
        return
    record.label, outer = recorder.label, recorder.current
    recorder.current, start = record, time.perf_counter()
    try:
        yield record
        jax.block_until_ready(getattr(record, "result", None))
    finally:
        recorder.current = outer
    record.seconds = time.perf_counter() - start
    if hasattr(record, "result"):
        del record.result
    recorder.calls.append(record)
