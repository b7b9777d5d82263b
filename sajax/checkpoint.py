"""Orbax checkpoints of the train state together with the data-iterator state and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous; orbax writes each step to a
temporary name and commits it atomically, so a crash mid-save leaves the previous checkpoints intact and
`latest_step()` only ever sees complete ones.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int, every: int, owner: bool = True):
        """`owner`: the training run (removes temporary directories a crash left behind); readers such as
        export pass False so that they never touch a save in progress."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                                 cleanup_tmp_directories=owner),
            item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save (every `every` steps, or now if `force`); returns whether it saves."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state):
        """(state, data_state, meta) of `step`; `abstract_state` holds ShapeDtypeStructs with the target
        shardings (restoring onto another mesh reshards)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings (the target of a restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
