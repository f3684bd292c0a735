"""The run's configuration: data, training and parallel layout, with the model's
(``moekit.model.config.ModelConfig``, whose MoE layers take ``moekit.moe.config.MoEConfig``).

Every field is checked where it is defined (``__post_init__``): a bad value raises one
``ValueError`` line naming the field, the value, the constraint and the fix
(``moekit.checks``). TOML recipes and ``--set`` overrides are read by ``moekit.recipe``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.checks import bad, check_bool, check_choice, check_int, check_real, is_int
from moekit.data.mixture import check_mixture
from moekit.model.config import ModelConfig
from moekit.moe.config import MoEConfig, default_moe
from moekit.recipe import apply_overrides, load_toml

__all__ = ["DataConfig", "DistillConfig", "FinetuneConfig",
           "ModelConfig", "MoEConfig", "ParallelConfig", "RunConfig", "TrainConfig",
           "apply_overrides", "check_layout", "default_moe"]


@dataclass
class DataConfig:
    corpus: str = "parlspeech"        # a catalog name (moekit data list) or a path to your text: a text
                                      # file, a directory, JSONL, a .parquet file or a directory of shards
    text_column: str = "text"         # the column (Parquet) or field (JSONL) holding the text
    vocab_size: int = 8192            # BPE vocabulary trained on the training split
    seq_len: int = 128
    val_fraction: float = 0.05
    max_docs: int | None = None       # use only the first N documents (quick runs, tests)
    task: str | None = None           # fine-tuning: a catalog task or a JSONL file (moekit.data.tasks);
                                      # set, it replaces the corpus
    task_labels: list[str] | None = None   # the label set of a {"text", "label"} task file
    mixture: list[dict] | None = None  # several sources with weights and tags (moekit.data.mixture);
                                       # set, it replaces the corpus

    def __post_init__(self) -> None:
        own = "DataConfig"
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise bad(own, "corpus", self.corpus, "must name a catalog corpus or a path",
                      "use e.g. 'parlspeech' (moekit data list) or a path to your text")
        if not isinstance(self.text_column, str) or not self.text_column.strip():
            raise bad(own, "text_column", self.text_column, "must name a column of the corpus",
                      "use the Parquet column (or JSONL field) holding the text, e.g. 'text'")
        check_int(own, "vocab_size", self.vocab_size, 257, "byte-level BPE needs >= 257; use e.g. 8192")
        check_int(own, "seq_len", self.seq_len, 2, "use e.g. 128")
        check_real(own, "val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True,
                   fix="use e.g. 0.05")
        if self.max_docs is not None:
            check_int(own, "max_docs", self.max_docs, 1, "use a count >= 1, or leave it unset for all")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise bad(own, "task", self.task, "must name a catalog task or a JSONL file",
                      "use e.g. 'rotten-tomatoes', or leave it unset to train on the corpus")
        if self.mixture is not None:
            self.mixture = check_mixture(self.mixture)
            if self.task is not None:
                raise bad(own, "mixture", "(set)", "cannot be combined with data.task",
                          "put the task into the mixture as source = \"task:NAME\", or drop the mixture")
        labels = self.task_labels
        if labels is not None and (not isinstance(labels, list) or len(labels) < 2
                                   or len(set(map(str, labels))) != len(labels)):
            raise bad(own, "task_labels", self.task_labels, "must be a list of at least 2 distinct labels",
                      'use e.g. ["negative", "positive"], or leave it unset for the labels the file uses')


@dataclass
class TrainConfig:
    batch_size: int = 16               # sequences per micro-batch (per rank)
    grad_accum: int = 1                # micro-batches per optimizer step
    max_steps: int = 750
    lr: float = 1.55e-3                # the default recipe's, measured (docs/moe_vs_dense.md)
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None    # None = max_steps // 5 (set when built): a 40-step warmup at
                                       # lr 3e-3 collapsed 32-expert routing (docs/scaling_experts.md)
    decay_steps: int | None = None     # the cosine ends here (None = max_steps), then the LR stays at
                                       # its floor: a run extended past its first max_steps keeps it
    schedule_start: int = 0            # the LR schedule's step at this run's step 0: a continued stage
                                       # goes on with one longer schedule instead of re-warming (warmup
                                       # and decay_steps count schedule steps; decay_steps None = start
                                       # + max_steps)
    weight_decay: float = 0.1          # not on norms, biases, embeddings' gains or routers
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float = 1.7e-3      # x load-balancing loss (k at perfect balance); measured as lr
    z_loss_coef: float = 1e-3          # x router z-loss
    router_lr_scale: float = 1.0       # the routers' LR = this x the schedule's LR
    max_bad_steps: int = 3             # non-finite loss or gradient norm: skip that many steps, then stop
    eval_every: int = 100
    eval_at_start: bool = False        # the validation loss before the first step too (a run --from a
                                       # model: where its curve starts)
    eval_batches: int = 16
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"            # "bf16" autocast, "fp32", or "auto": bf16 on CUDA, fp32 on CPU
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    compile: bool = False
    activation_checkpointing: bool = False
    telemetry: bool = True             # per-layer routing statistics every log_every steps
    init_from: str | None = None       # start from these weights (train --from): a run, export or
                                       # Hugging Face directory, or a catalog model; their architecture
    init_optimizer: bool = False       # with init_from: start from SRC's AdamW state (a run's checkpoint,
                                       # or the optimizer.safetensors moekit upcycle / grow carried)
    expert_schedule: str | None = None  # experts per MoE layer from a step on: "4@0, 8@300, 16@600"
    expert_growth: str = "all"         # which experts a growth copies: "all" equally | "most_loaded"
    expert_growth_noise: float = 0.01  # N(0, s) on the copies' router rows: without it a copy and its
                                       # source get the same tokens and gradients and never diverge

    def __post_init__(self) -> None:
        own = "TrainConfig"
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every",
                     "log_every"):
            check_int(own, name, getattr(self, name))
        if self.warmup_steps is None and is_int(self.max_steps) and self.max_steps >= 1:
            self.warmup_steps = self.max_steps // 5
        for name in ("warmup_steps", "seed", "max_bad_steps", "schedule_start"):
            check_int(own, name, getattr(self, name), 0)
        if self.decay_steps is not None:
            check_int(own, "decay_steps", self.decay_steps, 1, "leave it unset (= max_steps)")
        check_real(own, "lr", self.lr, 0, low_open=True, fix="use e.g. 3e-3")
        check_real(own, "min_lr_ratio", self.min_lr_ratio, 0, 1, fix="use e.g. 0.1")
        check_real(own, "weight_decay", self.weight_decay, 0, fix="use e.g. 0.1, or 0 for none")
        for name in ("beta1", "beta2"):
            check_real(own, name, getattr(self, name), 0, 1, high_open=True, fix="use e.g. 0.9 / 0.95")
        check_real(own, "grad_clip", self.grad_clip, 0, low_open=True,
                   fix="use e.g. 1.0 (a large value such as 1e9 leaves gradients unclipped)")
        check_real(own, "router_lr_scale", self.router_lr_scale, 0, low_open=True,
                   fix="use e.g. 0.1 for routers 10x slower, or 1 for the same LR")
        for name in ("aux_loss_coef", "z_loss_coef"):
            check_real(own, name, getattr(self, name), 0, fix="use e.g. 0.01 / 1e-3, or 0 to turn it off")
        check_choice(own, "precision", self.precision, ("auto", "bf16", "fp32"))
        check_choice(own, "device", self.device, ("auto", "cpu", "cuda"))
        for name in ("compile", "activation_checkpointing", "telemetry", "init_optimizer", "eval_at_start"):
            check_bool(own, name, getattr(self, name))
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise bad(own, "init_from", self.init_from, "is not a path or a catalog model name",
                      "give a run/export/Hugging Face directory or e.g. 'smollm2-135m', or leave it unset")
        check_choice(own, "expert_growth", self.expert_growth, ("all", "most_loaded"))
        check_real(own, "expert_growth_noise", self.expert_growth_noise, 0,
                   fix="use e.g. 0.01, or 0 for exact copies")
        if self.expert_schedule is not None:
            schedule = parse_expert_schedule(self.expert_schedule)
            if schedule[-1][0] >= self.max_steps:
                raise bad(own, "expert_schedule", self.expert_schedule, f"grows at step {schedule[-1][0]}, "
                          f"not before max_steps={self.max_steps}", "give growth steps < max_steps")

    def experts_at(self, step: int) -> int | None:
        """The experts per MoE layer that :attr:`expert_schedule` gives from ``step`` on (None
        without a schedule)."""
        if self.expert_schedule is None:
            return None
        return [n for s, n in parse_expert_schedule(self.expert_schedule) if s <= step][-1]


_SCHEDULE_FIX = "write experts@step pairs, increasing in both, from step 0, e.g. '4@0, 8@300, 16@600'"


def parse_expert_schedule(text) -> list[tuple[int, int]]:
    """"4@0, 8@300, 16@600" -> [(0, 4), (300, 8), (600, 16)]: (step, experts per MoE layer
    from that step on), both strictly increasing, starting at step 0; one line otherwise.
    Parsed once per text (the trainer asks before every step)."""
    if not isinstance(text, str):
        raise bad("TrainConfig", "expert_schedule", text, "must be a string", _SCHEDULE_FIX)
    return list(_parsed_schedule(text))


@functools.lru_cache(maxsize=64)
def _parsed_schedule(text: str) -> tuple[tuple[int, int], ...]:
    def fail(constraint: str) -> ValueError:
        return bad("TrainConfig", "expert_schedule", text, constraint, _SCHEDULE_FIX)

    if not text.strip():
        raise fail("is empty (leave it unset for a fixed expert count)")
    out = []
    for part in text.split(","):
        hit = re.fullmatch(r"\s*(\d+)\s*@\s*(\d+)\s*", part)
        if hit is None:
            raise fail(f"{part.strip()!r} is not experts@step")
        out.append((int(hit[2]), int(hit[1])))
    if out[0][0] != 0:
        raise fail(f"starts at step {out[0][0]}, not 0 (the count at step 0 is what the run starts with)")
    for (s0, n0), (s1, n1) in zip(out, out[1:]):
        if s1 <= s0:
            raise fail(f"step {s1} does not come after step {s0}")
        if n1 <= n0:
            raise fail(f"{n1} experts at step {s1} is not more than {n0} (a schedule only grows)")
    if out[0][1] < 1:
        raise fail("starts with no experts")
    return tuple(out)


@dataclass
class ParallelConfig:
    """dp x ep ranks.

    ``sharding``: "none" = DDP for the non-expert parameters; "fsdp" = FSDP2 ``fully_shard``
    of the non-expert parameters over all ranks and of the experts along "dp". Expert
    parameters are split by ep; their gradients are reduced over the data-parallel ranks
    that hold the same experts only."""

    dp: int = 1
    ep: int = 1
    sharding: str = "none"

    def __post_init__(self) -> None:
        for name in ("dp", "ep"):
            check_int("ParallelConfig", name, getattr(self, name))
        check_choice("ParallelConfig", "sharding", self.sharding, ("none", "fsdp"))

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    def check_world(self, world: int, launched: str = "process(es) run") -> None:
        """dp x ep must be the number of processes: the one place this is checked."""
        if self.world_size != world:
            raise ValueError(f"parallel.dp x parallel.ep = {self.dp} x {self.ep} = {self.world_size} but "
                             f"{world} {launched}; launch {self.world_size} (torchrun --nproc-per-node) "
                             "or change parallel.dp/ep (leave both unset for data parallelism)")


def _default_model() -> ModelConfig:
    return ModelConfig(moe=default_moe(ModelConfig.d_model))


# FinetuneConfig: what a fine-tuning run freezes and adapts (the ``[finetune]`` section).
#
# Defaults and where they come from:
#
# - ``freeze = "none"``: full fine-tuning. "router" freezes the routers (the routing learnt in
#   pretraining is kept); "moe" the MoE layers (routers and experts: ST-MoE found this about as
#   good as full fine-tuning); "non_expert" everything but the MoE layers (ST-MoE: it hurts);
#   "esft" trains only the experts the task routes most tokens to (Wang et al. 2024, ESFT),
#   everything else frozen.
# - ``esft_share = 0.2``: ESFT-Token's rule: in each MoE layer take experts by their share of
#   the task's routed tokens, most used first, until the shares add up to at least this.
# - ``lora_rank``: LoRA (Hu et al. 2021) on ``lora_targets`` with ``lora_alpha`` (scale alpha / r);
#   the base weights are frozen. On the experts it adapts every expert's slice of the stacked
#   3-D weights (moekit.transform.lora). An export merges the adapters. ``lora_also``: groups
#   that train in full beside the adapters (peft's modules_to_save): "embeddings" (with tied
#   embeddings also the output head), "norms", "routers". Measured on rotten-tomatoes from a
#   4.7M-active news model: with the tied embedding frozen the label token's loss stayed at
#   ~3 nats (its row cannot reach a high logit) and LoRA stayed at the majority class; with
#   "embeddings" it learns.
# - ``eval_examples = 512``: validation accuracy during training on the first N validation
#   examples; ``test_examples = None``: test accuracy at the end on the whole test split (or
#   its first N: a large model on a CPU).
FREEZE = ("none", "router", "moe", "non_expert", "esft")
LORA_TARGETS = ("experts", "attention", "dense_ffn", "shared")
LORA_ALSO = ("embeddings", "norms", "routers")


@dataclass
class FinetuneConfig:
    freeze: str = "none"
    esft_share: float = 0.2
    esft_experts: dict | None = None      # {MoE layer: [experts]} ESFT chose (set when the run starts)
    lora_rank: int | None = None          # None = no LoRA
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["experts", "attention"])
    lora_also: list[str] = field(default_factory=list)
    eval_examples: int = 512
    test_examples: int | None = None

    def __post_init__(self) -> None:
        own = "FinetuneConfig"
        check_choice(own, "freeze", self.freeze, FREEZE)
        check_real(own, "esft_share", self.esft_share, 0, 1, low_open=True, fix="use e.g. 0.2")
        if self.lora_rank is not None:
            check_int(own, "lora_rank", self.lora_rank, 1, "use e.g. 8, or leave it unset for no LoRA")
            if self.freeze != "none":
                raise bad(own, "freeze", self.freeze, "cannot be combined with LoRA (LoRA freezes every "
                          "base weight and trains only its adapters)", "set freeze='none' or drop lora_rank")
        check_real(own, "lora_alpha", self.lora_alpha, 0, low_open=True, fix="use e.g. 16")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if not isinstance(self.lora_targets, list) or not self.lora_targets:
            raise bad(own, "lora_targets", self.lora_targets, "must be a non-empty list",
                      f"use some of {list(LORA_TARGETS)}")
        for t in self.lora_targets:
            if t not in LORA_TARGETS:
                raise bad(own, "lora_targets", self.lora_targets, f"has {t!r}",
                          f"use some of {list(LORA_TARGETS)}")
        if isinstance(self.lora_also, str):
            self.lora_also = [t.strip() for t in self.lora_also.split(",") if t.strip()]
        if not isinstance(self.lora_also, list) or any(t not in LORA_ALSO for t in self.lora_also):
            raise bad(own, "lora_also", self.lora_also, f"must be a list of {list(LORA_ALSO)}",
                      "use e.g. ['embeddings'], or [] for the adapters alone")
        if self.lora_also and self.lora_rank is None:
            raise bad(own, "lora_also", self.lora_also, "needs LoRA",
                      "set finetune.lora_rank, or drop lora_also")
        check_int(own, "eval_examples", self.eval_examples, 1, "use e.g. 512")
        if self.test_examples is not None:
            check_int(own, "test_examples", self.test_examples, 1, "use e.g. 1000, or leave it unset for all")
        if self.esft_experts is not None and self.freeze != "esft":
            raise bad(own, "esft_experts", self.esft_experts, f"is only read with freeze='esft' (freeze is "
                      f"{self.freeze!r})", "set finetune.freeze='esft', or drop esft_experts")
        if self.esft_experts is not None:
            self.esft_experts = {int(k): sorted(int(e) for e in v)
                                 for k, v in dict(self.esft_experts).items()}


# Distillation (moekit.train.objectives.Distillation): a run distills when teacher is set.
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


@dataclass
class RunConfig:
    """Everything a training run needs; loaded from TOML, overridden with ``--set a.b=c``.

    Example:
        >>> cfg = RunConfig.from_dict({"train": {"max_steps": 5}, "model": {"moe": {"num_experts": 4}}})
        >>> cfg.train.max_steps, cfg.model.moe.num_experts, cfg.model.moe.d_model == cfg.model.d_model
        (5, 4, True)
    """

    model: ModelConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_layout(self.parallel, self.model)
        check_schedule(self.train, self.model, self.parallel)
        check_finetune(self)
        if self.distill.teacher is not None and self.train.init_from is not None:
            raise ValueError(f"distill.teacher={self.distill.teacher!r} and train.init_from="
                             f"{self.train.init_from!r}: a distilled student starts from fresh weights; "
                             "drop train.init_from (--from)")

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        return build(cls, raw)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        return cls.from_dict(apply_overrides(load_toml(path), overrides))

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, torch.dtype):
                return str(v).replace("torch.", "")
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(self)


def check_new_run(cfg: RunConfig) -> list[str]:
    """What a new run's recipe may not combine, checked when it starts (with ``--from``, against
    the source's architecture): windows longer than the model's positions are refused; returns
    the warnings to log (a warmup longer than the run: short runs of a longer schedule, tests
    and smoke runs, do this on purpose). A saved config is not checked again, so every run that
    once started still loads and resumes."""
    t, m = cfg.train, cfg.model
    if t.init_optimizer and t.init_from is None:
        raise ValueError("train.init_optimizer=true needs --from SRC (train.init_from), whose AdamW state it "
                         "starts with; add --from SRC, or drop train.init_optimizer")
    if cfg.data.seq_len > m.max_seq_len:
        src = f" (the model of --from {t.init_from})" if t.init_from else ""
        fix = "" if t.init_from else " or raise model.max_seq_len"
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is more than model.max_seq_len={m.max_seq_len}"
                         f"{src}: the model has no positions past {m.max_seq_len}; use data.seq_len <= "
                         f"{m.max_seq_len}{fix}")
    warnings = []
    if (is_int(t.warmup_steps) and is_int(t.max_steps) and t.schedule_start == 0
            and t.warmup_steps > t.max_steps):
        last = t.lr * t.max_steps / t.warmup_steps
        warnings.append(f"train.warmup_steps={t.warmup_steps} is more than train.max_steps={t.max_steps}: "
                        f"the LR never reaches train.lr={t.lr:g} (the last step's is {last:.3g}); use "
                        f"warmup_steps <= {t.max_steps} (unset, it is max_steps // 5 = {t.max_steps // 5})")
    return warnings


def check_finetune(cfg: RunConfig) -> None:
    """What freezing and LoRA cannot be combined with (yet): one line each."""
    ft, par = cfg.finetune, cfg.parallel
    what = (f"finetune.lora_rank={ft.lora_rank}" if ft.lora_rank is not None
            else f"finetune.freeze={ft.freeze!r}" if ft.freeze != "none" else None)
    if what is None:
        return
    if cfg.train.expert_schedule is not None:
        raise ValueError(f"{what} cannot be combined with train.expert_schedule (a growth rebuilds the "
                         "experts it froze or adapted); drop one of them")
    if (ft.lora_rank is not None or ft.freeze == "esft") and (par.ep > 1 or par.sharding != "none"):
        raise ValueError(f"{what} runs on one process or data parallel (DDP); parallel.ep={par.ep}, "
                         f"sharding={par.sharding!r} would replace the parameters it adapts: use "
                         "parallel.ep=1, sharding='none'")


def check_layout(parallel: ParallelConfig, model: ModelConfig) -> None:
    """What a layout needs from the model, checked before any data is prepared."""
    moe = model.moe
    if parallel.ep > 1:
        if moe is None:
            raise ValueError(f"parallel.ep={parallel.ep} needs an MoE model (model.moe is unset); "
                             "use parallel.dp for a dense model")
        if moe.num_experts % parallel.ep:
            raise ValueError(f"parallel.ep={parallel.ep} does not divide model.moe.num_experts="
                             f"{moe.num_experts}; pick ep among the divisors of the number of experts")
        if moe.router == "expert_choice":
            raise ValueError("parallel.ep > 1 with model.moe.router='expert_choice': expert choice needs "
                             "every token on every rank; use a token-choice router or ep=1")
        if parallel.sharding == "fsdp" and (model.d_model % parallel.dp or moe.d_ff % parallel.dp):
            raise ValueError(f"parallel.dp={parallel.dp} with sharding='fsdp' and ep={parallel.ep} shards "
                             f"the experts' d_model={model.d_model} and d_ff={moe.d_ff} evenly; make both "
                             "multiples of dp or use sharding='none'")


def check_schedule(train: TrainConfig, model: ModelConfig, parallel: ParallelConfig) -> None:
    """What train.expert_schedule needs from the model and the layout, when the config is built."""
    if train.expert_schedule is None:
        return
    where = f"train.expert_schedule={train.expert_schedule!r}"
    moe = model.moe
    if moe is None:
        raise ValueError(f"{where} grows the experts of MoE layers but the model is dense (model.moe is "
                         "unset); give model.moe or drop the schedule")
    if moe.router_input != "token":
        raise ValueError(f"{where} cannot grow a router that routes by tag (model.moe.router_input="
                         f"{moe.router_input!r}) yet; use router_input='token' or drop the schedule")
    if moe.dynamic_k in ("top_p", "null"):   # what moekit.transform.grow_experts refuses, said up front
        raise ValueError(f"{where} cannot grow the experts of a dynamic_k={moe.dynamic_k!r} router (copies "
                         "change which experts a token takes: a different function); use dynamic_k='relu' "
                         "or 'none', or drop the schedule")
    counts = [n for _, n in parse_expert_schedule(train.expert_schedule)]
    if counts[0] < moe.top_k and not moe.dynamic:
        raise ValueError(f"{where} starts with {counts[0]} expert{'s' * (counts[0] > 1)}, fewer than "
                         f"model.moe.top_k={moe.top_k}; start with >= {moe.top_k} experts")
    if moe.num_experts not in counts:
        if train.init_from is not None:
            raise ValueError(f"{where}: train.init_from={train.init_from!r} has {moe.num_experts} experts; "
                             f"start the schedule at {moe.num_experts}@0")
        raise ValueError(f"{where} never has model.moe.num_experts={moe.num_experts} experts; leave "
                         f"num_experts unset (it is then the count at step 0) or set it to {counts[0]}")
    uneven = [n for n in counts if n % parallel.ep]
    if uneven:
        raise ValueError(f"{where}: parallel.ep={parallel.ep} does not divide {uneven[0]} experts; use "
                         f"counts that are multiples of {parallel.ep} or another ep")
    if train.expert_growth == "all":
        for a, b in zip(counts, counts[1:]):
            if b % a:
                raise ValueError(f"{where}: {a} -> {b} experts is not a whole multiple, which "
                                 "train.expert_growth='all' needs (every expert copied equally); use "
                                 f"e.g. {a} -> {2 * a} or train.expert_growth='most_loaded'")


# A RunConfig from a nested dict (TOML, --set, a saved config.json). A section left out takes
# its defaults; an MoE section given in part takes the recipe's default MoE (default_moe) for
# the rest. Keys written by older moekit versions are translated (router_dtype, which had one
# legal value; moe_layers = "none", now moe = false).

def _legacy(cls_name: str, raw: dict) -> dict:
    """Keys of configs saved by older moekit versions, in today's terms."""
    raw = dict(raw)
    if cls_name == "MoEConfig" and raw.get("router_dtype", "float32") in ("float32", "torch.float32"):
        raw.pop("router_dtype", None)
    if cls_name == "ModelConfig" and raw.get("moe_layers") == "none":
        raw["moe"], raw["moe_layers"] = None, "all"
    return raw


def _schedule_start(raw: dict) -> dict:
    """A recipe with train.expert_schedule and no model.moe.num_experts starts with the
    schedule's count at step 0 (a bad schedule is left for TrainConfig to name)."""
    train, model = raw.get("train"), raw.get("model", {})
    text = train.get("expert_schedule") if isinstance(train, dict) else None
    moe = model.get("moe", {}) if isinstance(model, dict) else None
    if text is None or not isinstance(moe, dict) or "num_experts" in moe:
        return raw
    try:
        start = parse_expert_schedule(text)[0][1]
    except ValueError:
        return raw
    top_k = moe.get("top_k", 2)
    if not isinstance(top_k, int) or start < top_k:
        return raw                      # check_schedule names the schedule's too-small start
    return {**raw, "model": {**model, "moe": {**moe, "num_experts": start}}}


def build(cls, raw: dict, prefix: str = ""):
    """A dataclass (RunConfig and its sections) from a nested dict, naming unknown keys."""
    if not isinstance(raw, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'} must be a table, got {raw!r}")
    raw = _legacy(cls.__name__, raw)
    if cls is RunConfig:
        raw = _schedule_start(raw)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys in "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    sections = {RunConfig: {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                            "parallel": ParallelConfig, "finetune": FinetuneConfig,
                            "distill": DistillConfig},
                ModelConfig: {"moe": MoEConfig}}.get(cls, {})
    kwargs = {}
    d_model = raw.get("d_model", names["d_model"].default) if cls is ModelConfig else None
    for key, value in raw.items():
        sub = sections.get(key)
        if sub is MoEConfig:
            if value is None or value is False:
                kwargs[key] = None
                continue
            if isinstance(value, dict):
                defaults = dataclasses.asdict(default_moe(d_model)) if isinstance(d_model, int) else {}
                value = {k: defaults[k] for k in ("d_model", "d_ff", "num_experts", "top_k")
                         if k in defaults} | value
        kwargs[key] = build(sub, value, f"{prefix}{key}.") if sub else value
    if cls is ModelConfig and "moe" not in raw and isinstance(d_model, int):   # the recipe default is MoE
        kwargs["moe"] = default_moe(d_model) if d_model > 0 else None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'}: {err}") from None
    except ValueError as err:           # "MoEConfig.d_ff=0: ..." -> "model.moe.d_ff=0: ...": the key set
        owner = f"{cls.__name__}."
        if prefix and str(err).startswith(owner):
            raise ValueError(prefix + str(err)[len(owner):]) from None
        raise
