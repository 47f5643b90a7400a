"""Building blocks shared by algorithms, never defined inside one.

- :mod:`~kdfl.algorithms.kit.weights`: weight deltas, their checks and robust averaging.
- :mod:`~kdfl.algorithms.kit.logits`: logit-space maps and (class-weighted) robust logit rules.
- :mod:`~kdfl.algorithms.kit.distill`: the server's distillation settings and loop.
- :mod:`~kdfl.algorithms.kit.server_opt`: server optimizers as small composable transforms.
"""
