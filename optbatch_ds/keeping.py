"""What a run keeps: checkpoints (full or weights-only, rotated), the best evaluation, early stopping, and the
final export (the last or the best weights; a plain Hugging Face model, or a LoRA adapter plus its merge).

    keeper = Keeper.build(rs, engine, prep, out_dir, rank, keep_alive)
    path = keeper.save(step, client_state)            # collective; rotation (--save-total-limit) after it
    improved = keeper.note_evaluation(step, result)   # collective: rank 0's held-out loss, broadcast
    if keeper.should_stop(): ...                      # --early-stopping-patience
    keeper.export(step)                               # collective: final/ (and final/adapter/ with --use-peft)

A checkpoint is DeepSpeed's (engine, optimizer, client state: resumable) or, with --save-only-model, the weights
alone as a Hugging Face directory (final/'s layout; the adapter only with --use-peft), marked not resumable.
With LoRA, DeepSpeed checkpoints leave the frozen base out (`exclude_frozen_parameters`): it is reloaded from the
model directory on resume, so a 7B LoRA checkpoint is the adapters and their Adam state, not ~100 GB.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from optbatch_ds import comm
from optbatch_ds.adapters import ADAPTER_DIR, LoraExport, export_lora, merge_adapter
from optbatch_ds.checkpoint import is_complete, is_resumable, rotate, save_rng, write_complete_marker
from optbatch_ds.comm import log0
from optbatch_ds.export import export_hf
from optbatch_ds.modeling import training_dtype


@dataclass
class Keeper:
    """Checkpoints, the best evaluation and the export of one run, on one rank (decisions agree on every rank)."""

    run: object                  # RunConfig
    rank: int
    ckpt_root: str
    final_dir: str
    engine: object
    tokenizer: object
    stage3: bool
    lora: LoraExport | None      # None without --use-peft
    best: dict = field(default_factory=dict)   # {"step", "loss", "checkpoint"} of the lowest held-out loss
    stale: int = 0               # evaluations in a row without improvement
    best_result: dict | None = None            # rank 0: that evaluation's full result (eval.json of a best export)

    @classmethod
    def build(cls, rs, engine, prep, out: str, rank: int, keep_alive=None) -> "Keeper":
        """From the resolved config, the engine, the prepared run (`session.Prepared`: tokenizer, model path), the
        output directory and rank, and the run's HfDeepSpeedConfig under ZeRO-3 (for the LoRA merge)."""
        run = rs.run
        lora = (LoraExport(prep.model_path, training_dtype(rs.ds), run.merge_lora, keep_alive, run.trust_remote_code)
                if run.use_peft else None)
        return cls(run, rank, os.path.join(out, "checkpoints"), os.path.join(out, "final"), engine, prep.tokenizer,
                   rs.zero_stage == 3, lora)

    # ------------------------------------------------------------------ checkpoints

    def tag_dir(self, step: int) -> str:
        return os.path.join(self.ckpt_root, f"step_{step:06d}")

    def save(self, step: int, client: dict, full: bool = False) -> str:
        """A checkpoint at `step`: DeepSpeed's with `client` state (resumable), or with --save-only-model (and not
        `full`: a preemption always saves everything) the weights alone. COMPLETE once every rank has written;
        then rotation. Collective. Returns the tag directory."""
        path = self.tag_dir(step)
        weights_only = self.run.save_only_model and not full
        if weights_only:
            self._write_weights(path)
        else:
            self.engine.save_checkpoint(self.ckpt_root, tag=os.path.basename(path), client_state=client,
                                        exclude_frozen_parameters=self.lora is not None)
            save_rng(path, self.rank)
        comm.barrier()
        if self.rank == 0:
            write_complete_marker(path, step, resumable=not weights_only)
        if self.best.get("step") == step:
            self.best["checkpoint"] = path
        self.rotate()
        return path

    def _write_weights(self, path: str) -> None:
        if self.lora is not None:
            export_lora(self.engine, self.tokenizer, path, self.rank, LoraExport(**{**self.lora.__dict__,
                                                                                     "merge": False}))
        else:
            export_hf(self.engine, self.tokenizer, path, rank=self.rank, stage3=self.stage3)

    def rotate(self) -> None:
        """--save-total-limit N: the N newest complete checkpoints and the best stay. Collective (rank 0 deletes)."""
        if self.run.save_total_limit and self.rank == 0:
            gone = rotate(self.ckpt_root, self.run.save_total_limit, protect=(self.best.get("checkpoint"),))
            if gone:
                log0(f"--save-total-limit {self.run.save_total_limit}: removed {', '.join(map(os.path.basename, gone))}")
        comm.barrier()

    # ------------------------------------------------------------------ evaluations

    def note_evaluation(self, step: int, result: dict | None) -> bool:
        """Record an evaluation (rank 0's `result`; its held-out loss is broadcast so every rank decides alike).
        Returns whether it is the best so far. Collective."""
        tag = self.tag_dir(step)
        # rank 0 holds the result and decides whether the tag is complete: every rank then acts alike
        loss, saved = comm.broadcast_object((float(result["loss"]), is_complete(tag)) if result is not None
                                            else (None, False))
        if loss is None:
            return False
        if self.best and not loss < self.best["loss"]:
            self.stale += 1
            return False
        self.best = {"step": step, "loss": loss, "checkpoint": tag if saved else None}
        self.best_result = result
        self.stale = 0
        return True

    def wants_checkpoint_for_best(self, step: int) -> bool:
        """--export best needs the best evaluation's weights on disk: True when it was just made and none exists."""
        return self.run.export == "best" and self.best.get("step") == step and not self.best.get("checkpoint")

    def should_stop(self) -> bool:
        return bool(self.run.early_stopping_patience) and self.stale >= self.run.early_stopping_patience

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "stale": self.stale}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.best, self.stale = dict(state.get("best") or {}), int(state.get("stale", 0))

    # ------------------------------------------------------------------ export

    def export(self, step: int) -> int:
        """final/: the weights of `step` (the engine's), or with --export best those of the best evaluation
        (reloaded from its checkpoint). A plain HF model, or with --use-peft final/adapter/ plus the merge into
        final/ (unless --no-merge-lora). Collective. Returns the step whose weights were exported."""
        source = self.best.get("checkpoint") if self.run.export == "best" and self.best else None
        if source is None or self.best["step"] == step:
            self._export_engine()
            return step
        if comm.broadcast_object(is_resumable(source)):
            _, client = self.engine.load_checkpoint(self.ckpt_root, tag=os.path.basename(source),
                                                    load_module_strict=self.lora is None,
                                                    load_lr_scheduler_states=False)
            if client is None:
                raise RuntimeError(f"could not reload the best checkpoint {source} for --export best")
            self._export_engine()
        else:
            self._copy_weights(source)
        return self.best["step"]

    def _export_engine(self) -> None:
        if self.lora is not None:
            export_lora(self.engine, self.tokenizer, self.final_dir, self.rank, self.lora)
        else:
            export_hf(self.engine, self.tokenizer, self.final_dir, rank=self.rank, stage3=self.stage3)

    def _copy_weights(self, source: str) -> None:
        """final/ from a --save-only-model checkpoint (rank 0; the adapter merged again with --use-peft)."""
        if self.rank == 0:
            if os.path.isdir(self.final_dir):
                shutil.rmtree(self.final_dir)
            if self.lora is not None:
                shutil.copytree(os.path.join(source, ADAPTER_DIR), os.path.join(self.final_dir, ADAPTER_DIR))
                if self.lora.merge:
                    merge_adapter(os.path.join(self.final_dir, ADAPTER_DIR), self.final_dir, self.tokenizer, self.lora)
            else:
                shutil.copytree(source, self.final_dir, ignore=shutil.ignore_patterns("COMPLETE", "COMPLETE.tmp"))
        comm.barrier()
