"""The pruning core used by ``trainer.callbacks.prune.PruneRetrain``, one concern per file.

* :mod:`~trainer.prune.structured` -- channel removal on Torch-Pruning's dependency graph,
  importance criteria, ratios and rounding, the replayable plan (``StructuredPrune``);
* :mod:`~trainer.prune.sparsity` -- unstructured global-magnitude masks and making them permanent;
* :mod:`~trainer.prune.schedule` -- rounds and the cubic (AGP) schedule;
* :mod:`~trainer.prune.measure` -- params, MACs, channels kept;
* :mod:`~trainer.prune.rebuild` -- DDP wrapper, optimizers and their state after a change;
* :mod:`~trainer.prune.report` -- the per-round table (CSV, Markdown).

A run starts from a trained network through the core's ``model.init_from``.
"""
