"""Checkpoints.

- Model checkpoints in realm-jax's own format (`save_params` / `load_params`): an orbax
  PyTree of params plus `model.json` (the model config), written to a temporary folder and
  renamed into place.
- The trainer's checkpoints (`TrainCheckpoints`): the contract between the trainer, which
  writes them, and the refresher, which restores only the document tower from them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from realm_jax.durable import replace_folder
from realm_jax.sharding import placed_shapes
from realm_jax.models import EmbedderConfig, abstract_params, config_from_dict, config_to_dict
from realm_jax.workdir import MODEL_JSON, Workdir

PARAMS_DIR = "params"


def save_params(folder: str | os.PathLike, cfg, params) -> Path:
    folder = Path(folder).absolute()
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, params)
    (tmp / MODEL_JSON).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    replace_folder(tmp, folder)
    return folder


def load_params(folder: str | os.PathLike, shardings=None):
    """(model config, params). With `shardings` (a tree of NamedShardings) the params are
    restored directly onto their shards; otherwise as host numpy arrays."""
    folder = Path(folder).absolute()
    meta = folder / MODEL_JSON
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: missing; {folder} is not a realm-jax params checkpoint")
    cfg = config_from_dict(json.loads(meta.read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        if shardings is None:
            restored = ckptr.restore(folder / PARAMS_DIR)
            params = jax.tree.map(np.asarray, restored)
        else:
            params = ckptr.restore(folder / PARAMS_DIR,
                                   placed_shapes(abstract_params(cfg), shardings))
    return cfg, params


# ---------------------------------------------------------------------------------------
# The trainer's checkpoints:
#
#     WORKDIR/model.json                   {"query_tower": {...}, "doc_tower": {...},
#                                           "reader": {...}}: each part's config_to_dict
#     WORKDIR/checkpoints/                 an orbax CheckpointManager directory
#         <step>/params/                   the params pytree {"query_tower", "doc_tower", "reader"}
#         <step>/train_state/, <step>/meta/   optional: the rest of the train state, JSON facts
#     WORKDIR/checkpoints/FINISHED         written by the trainer when training ends
#                                          (WORKDIR/FINISHED is accepted too)
#
# A step folder appears only when complete (orbax renames it into place), so a reader that
# lists steps never sees a half-written one.

class CheckpointUnreadable(ValueError):
    """A checkpoint step whose files cannot be restored: missing or truncated files, or
    arrays other than model.json describes."""


_LIST_ATTEMPTS = 5  # listing the steps while the trainer prunes one can fail; tries
PARAMS_ITEM = "params"
STATE_ITEM = "train_state"
META_ITEM = "meta"
PARTS = ("query_tower", "doc_tower", "reader")


class TrainCheckpoints:
    """The trainer's orbax checkpoints under WORKDIR/checkpoints (see the layout above).

    The trainer calls `save` every few steps and `mark_finished` at the end; the refresher
    lists steps and restores the document tower (`restore_part`), each with its own
    instance; reads see the other side's new steps (the step list is re-read).

    In a multi-process run every process saves and restores (orbax writes each process's
    shards and synchronizes them); model.json and FINISHED are written by process 0 only.
    `independent`: this process reads on its own schedule, synchronizing with no other
    (the refresher's workers, each restoring when its job comes)."""

    def __init__(self, workdir: str | os.PathLike | Workdir, *, max_to_keep: int | None = None,
                 async_save: bool = False, independent: bool = False):
        self.layout = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        self.workdir = self.layout.root
        self.directory = self.layout.checkpoints
        self._max_to_keep = max_to_keep
        self._async_save = async_save
        self._independent = independent
        self._writer: ocp.CheckpointManager | None = None
        self._reader: ocp.CheckpointManager | None = None
        self._pinned: int | None = None

    # ---- writing (the trainer)

    def pin(self, step: int | None) -> None:
        """Keep `step`'s checkpoint past max_to_keep until another step (or None) is pinned:
        the trainer pins the checkpoint its index snapshot was embedded from, whose query
        tower embeds the queries (scann mode), so that a resumed run finds it again. A
        released step is pruned at the next save."""
        self._pinned = None if step is None else int(step)

    def _write_manager(self) -> ocp.CheckpointManager:
        if self._writer is None:
            keep = ocp.checkpoint_managers
            policy = None
            if self._max_to_keep is not None:
                policy = keep.AnyPreservationPolicy([keep.LatestN(n=self._max_to_keep),
                                                     _PinnedStep(lambda: self._pinned)])
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=self._async_save,
                create=True)
            self._writer = ocp.CheckpointManager(self.directory, options=options,
                                                 item_handlers=_item_handlers())
        return self._writer

    def save(self, step: int, params, *, train_state=None, meta: dict | None = None,
             force: bool = True) -> bool:
        """Save `params` ({part: params}) at `step`, with the optional rest of the train
        state and JSON facts."""
        if not isinstance(params, dict) or not params:
            raise ValueError(f"TrainCheckpoints.save: params must be a non-empty dict of parts "
                             f"(e.g. {PARTS}), got {type(params).__name__}")
        items = {PARAMS_ITEM: ocp.args.PyTreeSave(params)}
        if train_state is not None:
            items[STATE_ITEM] = ocp.args.PyTreeSave(train_state)
        if meta is not None:
            items[META_ITEM] = ocp.args.JsonSave(meta)
        return self._write_manager().save(int(step), args=ocp.args.Composite(**items),
                                          force=force)

    def wait_until_finished(self) -> None:
        if self._writer is not None:
            self._writer.wait_until_finished()

    def mark_finished(self) -> None:
        """Wait for pending saves, then write the FINISHED marker (process 0)."""
        self.wait_until_finished()
        self.layout.mark_finished(self.latest_step())

    # ---- reading (the refresher, or the trainer when it resumes)

    def model_configs(self, *required: str, hint: str = "") -> dict:
        """The parts' model configs from WORKDIR/model.json (`Workdir.read_model`)."""
        return self.layout.read_model(*required, hint=hint)

    def is_finished(self) -> bool:
        return self.layout.is_finished()

    def _read_manager(self) -> ocp.CheckpointManager | None:
        if self._writer is not None:  # the writer's own list is current (and a reload
            return self._writer         # could drop a save still in flight)
        for attempt in range(_LIST_ATTEMPTS):
            try:
                return self._list_steps()
            except FileNotFoundError:
                # The trainer pruned a step while orbax was reading it: list again.
                if attempt == _LIST_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)

    def _list_steps(self) -> ocp.CheckpointManager | None:
        """The read-only manager, (re)reading the steps on disk."""
        if self._reader is None:
            if not self.directory.exists():
                return None
            alone = {}
            if self._independent:  # barriers over this process only: none
                me = jax.process_index()
                alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me})
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, **alone)
            self._reader = ocp.CheckpointManager(self.directory, options=options,
                                                 item_handlers=_item_handlers())
        else:
            self._reader.reload()
        return self._reader

    def all_steps(self) -> list[int]:
        """Complete checkpoint steps on disk, ascending (re-read each call)."""
        manager = self._read_manager()
        return sorted(int(s) for s in manager.all_steps()) if manager is not None else []

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return os.fspath(self.directory / str(int(step)))

    def parts(self, step: int) -> list[str]:
        """The top-level names of the params saved at `step`."""
        return sorted(self._params_metadata(step))

    def _manager_of(self, step: int) -> ocp.CheckpointManager:
        """The read manager, which must hold `step` (else FileNotFoundError)."""
        manager = self._read_manager()
        if manager is None or int(step) not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
        return manager

    def step_or_latest(self, step: int | None = None, hint: str = "") -> int:
        """`step`, or the newest one (FileNotFoundError naming the folder, then `hint`, when
        there is none)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}{hint}")
        return step

    def _params_metadata(self, step: int) -> dict:
        tree = self._manager_of(step).item_metadata(int(step))[PARAMS_ITEM]
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, dict):
            raise ValueError(f"{self.step_path(step)}/{PARAMS_ITEM}: not a params dict")
        return tree

    def _part_shapes(self, step: int, part: str):
        """ShapeDtypeStructs of a part: from its config in WORKDIR/model.json (nothing of the
        checkpoint is read), else from the checkpoint's metadata."""
        try:
            configs = self.model_configs()
        except FileNotFoundError:
            configs = {}
        if part in configs:
            return abstract_params(configs[part])
        meta = self._params_metadata(step)
        if part not in meta:
            raise KeyError(f"checkpoint {self.step_path(step)} has no part {part!r}; it holds "
                           f"{sorted(meta)}")
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta[part])

    def restore_part(self, step: int, part: str, shardings=None):
        """Only the `part` subtree of step's params (an orbax partial restore: the other
        parts are not read). Host numpy arrays, or arrays placed on `shardings` (a tree of
        NamedShardings matching the part)."""
        manager = self._manager_of(step)
        shapes = self._part_shapes(step, part)
        if shardings is None:
            item = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
        else:
            item = placed_shapes(shapes, shardings)
            restore_args = jax.tree.map(
                lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape,
                                                   dtype=s.dtype), shapes, shardings)
        args = ocp.args.PyTreeRestore(item={part: item}, restore_args={part: restore_args},
                                      partial_restore=True)
        try:
            restored = manager.restore(int(step), args=ocp.args.Composite(**{PARAMS_ITEM: args}))
        except Exception as e:  # orbax and tensorstore raise many kinds
            try:
                parts = self.parts(step)
            except Exception:
                parts = [part]
            if part not in parts:
                raise KeyError(f"checkpoint {self.step_path(step)} has no part {part!r}; it "
                               f"holds {parts}") from None
            raise CheckpointUnreadable(
                f"{self.step_path(step)}: cannot restore {part!r} as the config in "
                f"{self.workdir / MODEL_JSON} describes it: {e}") from e
        return restored[PARAMS_ITEM][part]

    def restore_params(self, step: int):
        """All parts of step's params as host numpy arrays."""
        return {part: self.restore_part(step, part) for part in self.parts(step)}

    def restore(self, step: int, target=None):
        """A whole checkpoint: (state, meta dict or None).

        `target`: a train-state dataclass (e.g. `train.state.abstract_state`) of
        ShapeDtypeStructs with shardings; its `params` come from the params item and its
        other fields from the train_state item, each restored onto its sharding. Without a
        target: ({"params": ..., "train_state": ... or None}, meta) as host numpy arrays."""
        manager, step = self._manager_of(step), int(step)
        present = {p.name for p in (self.directory / str(step)).iterdir()}
        if target is None:
            host = lambda tree: jax.tree.map(  # noqa: E731
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            wanted = {name: None for name in (PARAMS_ITEM, STATE_ITEM) if name in present}
        else:
            fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
            wanted = {PARAMS_ITEM: fields.pop("params")}
            if fields:
                if STATE_ITEM not in present:
                    raise FileNotFoundError(f"{self.step_path(step)}: no {STATE_ITEM} to restore "
                                            f"{sorted(fields)} from")
                wanted[STATE_ITEM] = fields
        args = {}
        try:
            metadata = manager.item_metadata(step)
            for name, tree in wanted.items():
                if tree is None:
                    saved = getattr(metadata[name], "tree", metadata[name])
                    args[name] = ocp.args.PyTreeRestore(restore_args=host(saved))
                else:
                    args[name] = ocp.args.PyTreeRestore(
                        item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
            if META_ITEM in present:
                args[META_ITEM] = ocp.args.JsonRestore()
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax and tensorstore raise many kinds
            raise CheckpointUnreadable(f"{self.step_path(step)}: cannot restore ({e})") from e
        meta = restored[META_ITEM] if META_ITEM in present else None
        if target is None:
            return {PARAMS_ITEM: restored[PARAMS_ITEM],
                    STATE_ITEM: restored[STATE_ITEM] if STATE_ITEM in wanted else None}, meta
        rest = restored[STATE_ITEM] if STATE_ITEM in wanted else {}
        return dataclasses.replace(target, params=restored[PARAMS_ITEM], **rest), meta

    def set_aside(self, step: int) -> str:
        """Rename an unreadable step's folder to `<step>.unreadable[-N]` (kept, no longer a
        step), so that training resumes from the one before and may save this step again;
        returns the new path. Process 0 renames; the others only re-list."""
        target = self.directory / f"{int(step)}.unreadable"
        n = 0
        while target.exists():
            n += 1
            target = self.directory / f"{int(step)}.unreadable-{n}"
        if jax.process_index() == 0:
            (self.directory / str(int(step))).rename(target)
        if self._reader is not None:
            self._reader.reload()
        return os.fspath(target)

    def close(self) -> None:
        for manager in (self._writer, self._reader):
            if manager is not None:
                manager.close()
        self._writer = self._reader = None

    def __enter__(self) -> "TrainCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_part(workdir: str | os.PathLike, part: str, out: str | os.PathLike, *,
                step: int | None = None, architecture: str | None = None,
                tokenizer: str | os.PathLike | None = None) -> tuple[Path, int]:
    """Write one part of a trainer checkpoint (`step`, default the newest) as a Hugging Face
    folder, e.g. a REALM run's reader for ORQA fine-tuning (`model.reader_hf`); returns
    (the folder, the step). A retriever tower's folder keeps its pooling and normalisation
    (`hf.save_embedder`); `tokenizer`: a folder whose tokenizer files are copied in."""
    from realm_jax import hf

    with TrainCheckpoints(workdir) as checkpoints:
        configs = checkpoints.model_configs(part, hint=f" (--part {part})")
        step, steps = checkpoints.step_or_latest(step), checkpoints.all_steps()
        if step not in steps:
            raise FileNotFoundError(f"--step {step}: no such checkpoint in "
                                    f"{checkpoints.directory} (it holds {steps})")
        params = checkpoints.restore_part(step, part)
    extra = hf.tokenizer_files(tokenizer) if tokenizer else {}
    save = hf.save_embedder if isinstance(configs[part], EmbedderConfig) else hf.save
    return save(out, configs[part], params, architecture=architecture, extra_files=extra), step


@dataclasses.dataclass(frozen=True)
class _PinnedStep:
    """Orbax preservation policy: keep the step `pinned()` names (TrainCheckpoints.pin)."""
    pinned: Callable[[], int | None]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        step = self.pinned()
        return [info.step == step for info in checkpoints]


def _item_handlers() -> dict:
    return {PARAMS_ITEM: ocp.PyTreeCheckpointHandler(),
            STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}


