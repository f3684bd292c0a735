"""FinetuneConfig: what a fine-tuning run freezes and adapts (the ``[finetune]`` section).

Defaults and where they come from:

- ``freeze = "none"``: full fine-tuning. "router" freezes the routers (the routing learnt in
  pretraining is kept); "moe" the MoE layers (routers and experts: ST-MoE found this about as
  good as full fine-tuning); "non_expert" everything but the MoE layers (ST-MoE: it hurts);
  "esft" trains only the experts the task routes most tokens to (Wang et al. 2024, ESFT),
  everything else frozen.
- ``esft_share = 0.2``: ESFT-Token's rule: in each MoE layer take experts by their share of
  the task's routed tokens, most used first, until the shares add up to at least this.
- ``lora_rank``: LoRA (Hu et al. 2021) on ``lora_targets`` with ``lora_alpha`` (scale alpha / r);
  the base weights are frozen. On the experts it adapts every expert's slice of the stacked
  3-D weights (moekit.finetune.lora). An export merges the adapters. ``lora_also``: groups
  that train in full beside the adapters (peft's modules_to_save): "embeddings" (with tied
  embeddings also the output head), "norms", "routers". Measured on rotten-tomatoes from a
  4.7M-active news model: with the tied embedding frozen the label token's loss stayed at
  ~3 nats (its row cannot reach a high logit) and LoRA stayed at the majority class; with
  "embeddings" it learns.
- ``eval_examples = 512``: validation accuracy during training on the first N validation
  examples; ``test_examples = None``: test accuracy at the end on the whole test split (or
  its first N: a large model on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.checks import bad, check_choice, check_int, check_real

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
