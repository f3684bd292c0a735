"""Models in, models out: what a run, export or Hugging Face directory is, and the one loader
and writer every command uses.

    run_dir.py     the directories (run, export), the loader (:func:`load_model`, :func:`load_run`)
                   and the writer (:func:`save_export`); a quantized or LoRA model is built empty,
                   given its structure (moekit.transform), then loaded
    checkpoint.py  atomic single-file and sharded (torch.distributed.checkpoint) checkpoints
    source.py      where a new run starts from (``--from``: a run, export, HF directory, catalog model)
"""
