"""Distillation: an MoE teaches a (dense) student with soft targets (Hinton et al. 2015).

The student is an ordinary run of the training engine whose objective is
:class:`Distillation`: the loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)

(plus the student's own balancing terms if it is an MoE), on the tokens the LM loss counts.
Switch Transformer distilled its MoEs this way (alpha 0.25 on the hard loss there, i.e.
0.75 here, T 1) and kept about 30% of the MoE's gain over a dense model trained alone.

A run distills when ``distill.teacher`` is set (``moekit compress SRC --method distill``
sets it): it starts with fresh student weights (``model``: by default the teacher's dense
baseline with the same active parameters) and the teacher's tokenizer, so both read the
same token ids; ``alpha = 0`` is the same student trained alone on the same data, the
baseline the kept share is measured against. A resume loads the teacher again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.checks import bad, check_real


@dataclass
class DistillConfig:
    teacher: str | None = None          # a run, export or Hugging Face directory: the teacher
    temperature: float = 1.0            # T: both distributions are softened by it (1 = as is)
    alpha: float = 0.5                  # the soft term's weight; 1 - alpha on the next-token loss

    def __post_init__(self) -> None:
        own = "DistillConfig"
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher.strip()):
            raise bad(own, "teacher", self.teacher, "is not a path", "give the teacher's run directory")
        check_real(own, "temperature", self.temperature, 0, low_open=True, fix="use e.g. 1 or 2")
        check_real(own, "alpha", self.alpha, 0, 1, fix="use e.g. 0.5 (0 = no teacher: the student alone)")


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
        from moekit.train.evaluate import lm_loss
        from moekit.train.step import Loss, router_terms
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
    from pathlib import Path

    from moekit.train.run_dir import load_run
    path = Path(cfg.distill.teacher)
    if not path.exists():
        raise FileNotFoundError(f"distill.teacher {str(path)!r} does not exist; give the teacher's run "
                                "directory")
    model, tok, _ = load_run(path)
    return model.to(device), tok


def student_start(cfg):
    """(the run's config, a :class:`moekit.train.source.Initial` with no weights and the
    teacher's tokenizer, the teacher on the CPU) for a new distillation run: the student's
    vocabulary is the teacher's (the same token ids, padded rows included); the objective
    takes the teacher from here instead of reading it again."""
    import dataclasses

    from moekit.train.source import Initial
    teacher, tok = load_teacher(cfg, "cpu")
    if cfg.model.max_seq_len < cfg.data.seq_len:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=cfg.data.seq_len))
    model = dataclasses.replace(cfg.model, vocab_size=teacher.cfg.vocab_size)
    return dataclasses.replace(cfg, model=model), Initial(state=None, tokenizer=tok), teacher
