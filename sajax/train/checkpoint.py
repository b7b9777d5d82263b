"""Orbax checkpoints of the train state together with the data-iterator state and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous; orbax writes each step to a
temporary name and commits it atomically, so a crash mid-save leaves the previous checkpoints intact and
`latest_step()` only ever sees complete ones. A committed checkpoint that cannot be read back (a file truncated,
deleted or damaged later) is skipped by `restore_latest` with a warning naming it; the training run moves it to
`<workdir>/broken_checkpoints/<step>` so that the step can be saved again.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

import orbax.checkpoint as ocp

from sajax.parallel import distributed


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read back."""


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int, every: int, owner: bool = True):
        """`owner`: the training run (creates `checkpoints/`, removes temporary directories a crash left
        behind, moves unreadable checkpoints aside); readers such as export pass False so that they never
        change the directory nor touch a save in progress."""
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.owner = owner
        if owner:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                                   cleanup_tmp_directories=True)
        else:  # (not orbax's read_only, which warns on every start; readers simply never save)
            options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        """Waits for a save in progress and stops orbax's background threads, on every exit path."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save (every `every` steps, or now if `force`); returns whether it saves."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state):
        """(state, data_state, meta) of `step`; `abstract_state` holds ShapeDtypeStructs with the target
        shardings (restoring onto another mesh reshards). CheckpointError naming the step if it cannot be read."""
        _quiet_failed_restore_aftermath()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # tensorstore, zarr, json and orbax errors alike: the files are damaged
            raise CheckpointError(f"{self.directory / str(step)}: cannot be restored ({_root_cause(e)})") from e
        return restored["state"], restored["data"], restored["meta"]

    def restore_latest(self, abstract_state):
        """(step, state, data_state, meta) of the newest checkpoint that can be read back, or None if there is
        no checkpoint. Each unreadable newer one gets a warning naming it and, for the owner, is moved to
        `broken_checkpoints/` (so that training can save that step again); CheckpointError naming every one
        when none can be read (then nothing is moved)."""
        broken = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointError as e:
                broken.append((step, str(e)))
                sys.stderr.write(f"warning: {e}; trying the previous checkpoint\n")
                continue
            if self.owner:
                for bad, _ in broken:
                    self._move_aside(bad)
            return (step, *restored)
        if broken:
            raise CheckpointError("no checkpoint can be restored: " + "; ".join(message for _, message in broken))
        return None

    def _move_aside(self, step: int) -> None:
        """(Process 0 moves it; every process then sees the directory without it.)"""
        if distributed.is_main():
            target = self.workdir / "broken_checkpoints" / str(step)
            suffix = 1
            while target.exists():
                target = target.with_name(f"{step}.{suffix}")
                suffix += 1
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        distributed.barrier(f"sajax: checkpoint {step} moved aside")
        self.manager.reload()


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error (tensorstore's own message rather than orbax's wrapper)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


_quieted = False


def _from_orbax(error: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) passed through orbax's code."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def _quiet_failed_restore_aftermath() -> None:
    """When a restore fails, tensorstore reads still in flight complete on orbax's event loop, closed by then
    ('RuntimeError: Event loop is closed' through `sys.unraisablehook`); orbax's unfinished read coroutines raise
    when they are garbage-collected (the same hook) or warn that they were never awaited; their futures log
    'exception was never retrieved' (the `asyncio` logger). Dozens of tracebacks after the real error — some in the
    middle of the training that goes on from an older checkpoint — all consequences of the failure that was reported
    already: drop exactly those; everything else still reaches the previous hook and the log. Installed before the
    first restore, as they can fire while it is still failing."""
    global _quieted
    if _quieted:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        code = getattr(unraisable.object, "cr_code", None)  # orbax's read coroutines, closed unfinished
        if code is not None and "orbax" in code.co_filename:
            return
        previous(unraisable)

    def unretrieved(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage() and _from_orbax(error))

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(unretrieved)
    warnings.filterwarnings("ignore", message=r"coroutine '_read_\w+' was never awaited", category=RuntimeWarning)
    _quieted = True
