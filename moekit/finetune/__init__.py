"""Fine-tuning: supervised tasks, freezing, LoRA on the experts (moekit finetune)."""
