"""Teacher-student distillation: the pieces behind ``trainer.callbacks.distill.Distillation``.

* :mod:`trainer.distill.teacher` -- load, freeze and ensemble teachers.
* :mod:`trainer.distill.losses` -- the loss terms, each with its paper and formula.
* :mod:`trainer.distill.features` -- forward hooks on module paths.
* :mod:`trainer.distill.cache` -- offline teacher logits (``launch.py distill-cache``).

See ``README_distill.md`` in this folder for recipes and measured results.
"""
