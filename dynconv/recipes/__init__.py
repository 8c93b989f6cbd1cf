"""Training, evaluation and prediction recipes behind ``dynconv train|eval|predict|compare TASK``.

One flat module per task (copy-and-modify beats a deep base class); shared pieces are only checkpointing
(:mod:`dynconv.recipes.checkpoint`), the run folder (:mod:`dynconv.recipes.run_dir`: resume or refuse, stale
temporaries, the training log, atomic output files), the flags' checks (:mod:`dynconv.recipes.args`), the
progress bar (:mod:`dynconv.recipes.progress`) and process-group set-up (:mod:`dynconv.recipes.distributed`).
"""
