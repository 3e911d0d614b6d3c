"""Training an editor (MEND or KE) for any supported model, as the MEND code base's ``EditTrainer``.

One training step edits with one example: the gradient factors of the edit input x_e (prompt + new
target) go through the editor, the edited model is evaluated functionally, and
    L = c_edit * NLL(new target | x_e, x_e') + c_loc * KL(p_pre(. | x_loc) || p_post(. | x_loc))
is back-propagated into the editor only (the model's weights stay frozen). Gradients are accumulated
over ``accumulate_bs`` steps per Adam step, clipped at ``grad_clip``; a step whose loss is not finite
is skipped, as the reference's ``safe_backward`` does.

Reproducible and resumable: the example of step s is a function of (seed, s), the editor's initial
weights of the seed, and a checkpoint (written atomically at every validation, i.e. between
optimiser steps) holds the editor with its running statistics, the Adam state and the step, so a
resumed run continues exactly where the saved one stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from baselines.mend.batches import INNER, LOC, OUTER, EditExample, make_batch, segments_of
from baselines.mend.checkpoints import (
    FORMAT,
    EditorCheckpointMismatchError,
    check_native,
    native_payload,
    read_checkpoint,
    save_atomic,
)
from baselines.mend.editor_hparams import EditorHyperParams
from baselines.mend.editors import build_editor
from baselines.mend.functional import (
    RunnerFactory,
    current_weights,
    edited_weights,
    gradient_factors,
    inner_params,
    token_nll,
)
from baselines.mend.metrics import kl_loc_loss, locality_unchanged, mean, sequences_correct
from util.atomic_files import write_json_atomic
from util.scoring import model_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class StepOutcome:
    loss: torch.Tensor
    info: dict


class EditorTrainer:
    def __init__(
        self,
        kind: str,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        hparams: EditorHyperParams,
        train_examples: Sequence[EditExample],
        val_examples: Sequence[EditExample],
        out_path: Path,
        resume: bool = False,
        progress: bool = True,
    ):
        if not train_examples:
            raise ValueError("no training examples")
        self.kind, self.model, self.tok, self.hparams = kind, model, tok, hparams
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.out_path, self.progress = Path(out_path), progress
        self.params = inner_params(model, hparams.inner_params)
        self.first_block = min(p.block for p in self.params)
        self.weights = current_weights(model, self.params)
        self.device = model_device(model)
        with torch.random.fork_rng(devices=[]):  # seeded initial editor, global RNG left as it was
            torch.manual_seed(hparams.seed)
            self.editor = build_editor(kind, model, hparams)
        if hasattr(self.editor, "lr_scale"):
            self.editor.lr_scale = 1.0  # lr_scale is an edit-time knob; training learns the lrs themselves
        self.optimizer = torch.optim.Adam(self.editor.outer_param_groups(hparams))
        self.runners = RunnerFactory(hparams.implementation)
        self.step = 0
        self.history: list[dict] = []
        if resume:
            self._resume()

    # -- data -------------------------------------------------------------------------------------
    def example_at(self, step: int) -> EditExample:
        """Epoch-wise seeded permutations: the example of a step never depends on earlier runs."""
        n = len(self.train_examples)
        epoch, pos = divmod(step, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed * 100003 + epoch))
        return self.train_examples[int(perm[pos])]

    # -- one edit ---------------------------------------------------------------------------------
    def edit_step(self, example: EditExample, training: bool) -> StepOutcome:
        hp = self.hparams
        batch = make_batch(self.tok, segments_of(example), self.device, hp.max_length)
        runner = self.runners(self.model, batch, self.first_block)
        factors, pre, pre_loss = gradient_factors(runner, self.params)
        with torch.set_grad_enabled(training):
            updates = self.editor.updates(factors, condition=batch.sequence_ids(0))
            post = runner.logits(edited_weights(self.weights, updates))
            l_edit = token_nll(post, batch, batch.positions_of(INNER, OUTER))
            loc = batch.positions_of(LOC, targets_only=False)
            l_loc = kl_loc_loss(pre[loc], post[loc])
            loss = hp.c_edit * l_edit + hp.c_loc * l_loc
        with torch.no_grad():
            pre_ids, post_ids = pre.argmax(-1), post.argmax(-1)
            info = {
                "loss": float(loss), "edit_nll": float(l_edit), "loc_kl": float(l_loc), "pre_nll": float(pre_loss),
                "es": mean(sequences_correct(post_ids, batch, INNER)),
                "pre_es": mean(sequences_correct(pre_ids, batch, INNER)),
                "gs": mean(sequences_correct(post_ids, batch, OUTER)),
                "loc_unchanged": mean(locality_unchanged(pre_ids, post_ids, batch)),
            }
        return StepOutcome(loss, info)

    # -- training ---------------------------------------------------------------------------------
    def _optimiser_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.editor.parameters(), self.hparams.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train(self, steps: Optional[int] = None) -> list[dict]:
        """Train up to ``steps`` total steps (default hparams.train_steps), validating and checkpointing."""
        hp = self.hparams
        total = hp.train_steps if steps is None else steps
        if self.step == 0 and not self.history:
            self.validate_and_save()
        self.editor.train()
        recent: list[dict] = []
        bar = tqdm(range(self.step, total), desc=f"train {self.kind}", unit="edit", disable=not self.progress)
        for step in bar:
            out = self.edit_step(self.example_at(step), training=True)
            if math.isfinite(out.info["loss"]):
                (out.loss / hp.accumulate_bs).backward()
            else:
                LOG.warning("step %d: non-finite loss, skipped", step)
            self.step = step + 1
            if self.step % hp.accumulate_bs == 0:
                out.info["grad_norm"] = self._optimiser_step()
            recent = (recent + [out.info])[-100:]
            bar.set_postfix(loss=f"{mean([r['loss'] for r in recent]):.3f}", es=f"{mean([r['es'] for r in recent]):.2f}",
                            loc=f"{mean([r['loc_unchanged'] for r in recent]):.2f}")
            if self.step % hp.val_interval == 0:
                self.validate_and_save()
                self.editor.train()
        if self.step % hp.accumulate_bs:
            self._optimiser_step()  # flush a partial accumulation so the saved editor holds every step
        if not self.history or self.history[-1]["step"] != self.step:
            self.validate_and_save()
        return self.history

    @torch.no_grad()
    def validate(self, examples: Optional[Sequence[EditExample]] = None) -> dict:
        """Mean edit metrics over held-out examples, each edit applied alone to the unedited model."""
        examples = self.val_examples[: self.hparams.val_records] if examples is None else examples
        was_training = self.editor.training
        self.editor.eval()
        start = time.perf_counter()
        infos = [self.edit_step(ex, training=False).info for ex in
                 tqdm(examples, desc="validate", unit="edit", leave=False, disable=not self.progress)]
        self.editor.train(was_training)
        out = {k: mean([i[k] for i in infos if not math.isnan(i[k])]) for k in infos[0]} if infos else {}
        out.update({"n_records": len(infos), "seconds": time.perf_counter() - start})
        return out

    def validate_and_save(self) -> dict:
        stats = {"step": self.step, **self.validate()}
        self.history.append(stats)
        LOG.info("step %d validation: %s", self.step, {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()})
        self.save()
        return stats

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> None:
        save_atomic(self.out_path, native_payload(self.kind, self.editor, self.hparams, self.optimizer, self.step, self.history))
        write_json_atomic(self.out_path.with_suffix(".json"), {"editor": self.kind, "checkpoint": str(self.out_path),
                                                               "hparams": self.hparams.to_dict(), "history": self.history})

    def _resume(self) -> None:
        if not self.out_path.is_file():
            raise FileNotFoundError(f"cannot resume: {self.out_path} does not exist")
        raw = read_checkpoint(self.out_path)
        if raw.get("format") != FORMAT:
            raise EditorCheckpointMismatchError(f"{self.out_path}: not a {FORMAT} training checkpoint")
        check_native(raw, self.kind, self.hparams, self.out_path)
        self.editor.load_state_dict(raw["state"], strict=True)
        if raw.get("optimizer") is not None:
            self.optimizer.load_state_dict(raw["optimizer"])
        self.step, self.history = int(raw["step"]), list(raw.get("history", []))
        LOG.info("resumed %s training from %s at step %d", self.kind, self.out_path, self.step)
