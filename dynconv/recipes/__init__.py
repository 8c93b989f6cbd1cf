"""Training, evaluation and prediction recipes behind ``dynconv train|eval|predict TASK``.

One flat module per task (copy-and-modify beats a deep base class); shared pieces are only checkpointing
(:mod:`dynconv.recipes.checkpoint`) and process-group set-up (:mod:`dynconv.recipes.distributed`).
"""
