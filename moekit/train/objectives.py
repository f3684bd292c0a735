"""What a run minimises: every command's objective, for the one ``train_step``.

An objective maps (model output, :class:`Batch`) to a :class:`Loss`: the scalar backward sees
and its named parts (logged as ``loss/<name>``).

- :class:`Pretraining`: next-token loss + the router terms (:func:`router_terms`). Fine-tuning
  uses it too: its batches' targets are -100 on the prompt and padding
  (moekit.data.task_split), so the loss is on the completions.
- :class:`Distillation`: soft targets from a teacher mixed with the next-token loss.

:func:`objective_for` picks a run's; federated rounds and search trials train with the
objective their recipe names through the same entry (moekit.train.launch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.config import DistillConfig, TrainConfig
from moekit.model.transformer import ModelOutput
from moekit.store.run_dir import load_run
from moekit.store.source import Initial
from moekit.train.evaluate import lm_loss


@dataclass
class Batch:
    """One micro-batch: inputs [B, S] and next-token targets [B, S] (-100 = no loss)."""

    inputs: Tensor
    targets: Tensor
    tags: Tensor | None = None          # [B] per-window tags (language, source), if any


@dataclass
class Loss:
    total: Tensor                       # the differentiable scalar to minimize
    parts: dict[str, Tensor]            # named parts, logged as loss/<name> (detached by the step)


class Objective(Protocol):
    def __call__(self, out: ModelOutput, batch: Batch) -> Loss: ...


@dataclass
class Pretraining:
    """Next-token LM loss plus the MoE router terms (:func:`router_terms`; README:
    "Load-balancing loss")."""

    aux_loss_coef: float = TrainConfig.aux_loss_coef      # the default recipe's
    z_loss_coef: float = TrainConfig.z_loss_coef

    def __call__(self, out: ModelOutput, batch: Batch) -> Loss:
        lm = lm_loss(out.logits, batch.targets)
        total, parts = router_terms(lm, out, self.aux_loss_coef, self.z_loss_coef)
        return Loss(total, {"lm": lm, **parts})


def router_terms(base: Tensor, out: ModelOutput, aux_loss_coef: float, z_loss_coef: float
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """(base + aux_loss_coef x load balancing + z_loss_coef x z-loss + the relu routers' L1
    penalty, its parts): the router terms every objective adds. The L1 penalty comes already
    weighted by its adapted coefficient (moekit.moe.dynamic.relu_l1) and is a part only when
    some layer routes by relu."""
    total = base + aux_loss_coef * out.aux_loss + z_loss_coef * out.z_loss
    parts = {"aux": out.aux_loss, "z": out.z_loss}
    if any(a.sparsity_loss.requires_grad for a in out.moe.values()):
        total = total + out.sparsity_loss
        parts["sparsity"] = out.sparsity_loss
    return total, parts


def objective_for(run, teacher=None):
    """What the run minimises: next-token prediction with the balancing terms, or with
    ``distill.teacher`` set the distillation objective (``teacher``, the model a new run read
    already, else loaded here, on the run's device)."""
    t = run.cfg.train
    if run.cfg.distill.teacher is None:
        return Pretraining(t.aux_loss_coef, t.z_loss_coef)
    if run.cfg.distill.alpha == 0:
        teacher = None                      # the student alone: no teacher forward
    elif teacher is None:
        teacher = load_teacher(run.cfg, run.device)[0]
    else:
        teacher = teacher.to(run.device)
    return Distillation(teacher, run.cfg.distill, t.aux_loss_coef, t.z_loss_coef)


# Distillation: an MoE teaches a (dense) student with soft targets (Hinton et al. 2015).
#
# The student is an ordinary run of the training engine whose objective is
# :class:`Distillation`: the loss is
#
#     alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)
#
# (plus the student's own balancing terms if it is an MoE), on the tokens the LM loss counts.
# Switch Transformer distilled its MoEs this way (alpha 0.25 on the hard loss there, i.e.
# 0.75 here, T 1) and kept about 30% of the MoE's gain over a dense model trained alone.
#
# A run distills when ``distill.teacher`` is set (``moekit compress SRC --method distill``
# sets it): it starts with fresh student weights (``model``: by default the teacher's dense
# baseline with the same active parameters) and the teacher's tokenizer, so both read the
# same token ids; ``alpha = 0`` is the same student trained alone on the same data, the
# baseline the kept share is measured against. A resume loads the teacher again.


def soft_target_loss(student_BSV: torch.Tensor, teacher_BSV: torch.Tensor, targets_BS: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 x mean KL(teacher_T || student_T) over the positions whose target is not -100
    (float32; T^2 keeps the gradient's scale as T changes, Hinton et al.)."""
    keep = targets_BS.flatten() != -100
    s = F.log_softmax(student_BSV.float().flatten(0, 1)[keep] / temperature, -1)
    t = F.log_softmax(teacher_BSV.float().flatten(0, 1)[keep] / temperature, -1)
    if s.shape[0] == 0:
        return student_BSV.sum() * 0.0
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


class Distillation:
    """The objective: soft targets from ``teacher`` (eval mode, no gradient) mixed with the
    next-token loss; logged parts ``lm``, ``soft`` (and ``aux``, ``z`` for an MoE student)."""

    def __init__(self, teacher, cfg: DistillConfig, aux_loss_coef: float, z_loss_coef: float):
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.cfg, self.aux, self.z = cfg, aux_loss_coef, z_loss_coef

    def __call__(self, out, batch):
        lm = lm_loss(out.logits, batch.targets)
        total, parts = router_terms((1 - self.cfg.alpha) * lm, out, self.aux, self.z)
        parts = {"lm": lm, **parts}
        if self.teacher is not None and self.cfg.alpha > 0:
            with torch.no_grad():
                tags = {"tags": batch.tags} if self.teacher.cfg.routes_by_tag else {}
                teacher_logits = self.teacher(batch.inputs, **tags).logits
            soft = soft_target_loss(out.logits, teacher_logits, batch.targets, self.cfg.temperature)
            total = total + self.cfg.alpha * soft
            parts["soft"] = soft
        return Loss(total, parts)


def load_teacher(cfg, device):
    """(the teacher model on ``device``, its tokenizer) of ``cfg.distill.teacher``."""
    path = Path(cfg.distill.teacher)
    if not path.exists():
        raise FileNotFoundError(f"distill.teacher {str(path)!r} does not exist; give the teacher's run "
                                "directory")
    model, tok, _ = load_run(path)
    return model.to(device), tok


def student_start(cfg):
    """(the run's config, a :class:`moekit.store.source.Initial` with no weights and the
    teacher's tokenizer, the teacher on the CPU) for a new distillation run: the student's
    vocabulary is the teacher's (the same token ids, padded rows included); the objective
    takes the teacher from here instead of reading it again."""
    teacher, tok = load_teacher(cfg, "cpu")
    if cfg.model.max_seq_len < cfg.data.seq_len:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=cfg.data.seq_len))
    model = dataclasses.replace(cfg.model, vocab_size=teacher.cfg.vocab_size)
    return dataclasses.replace(cfg, model=model), Initial(state=None, tokenizer=tok), teacher
