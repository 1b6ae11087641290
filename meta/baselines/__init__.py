"""Reference implementations from other libraries, run on this project's models and task batches.

They are baselines to compare against (tests, the three-way experiment in ``experiments/three_way/``), never a
code path of the training script.
"""

from meta.baselines.learn2learn_maml import (
    Learn2LearnResult,
    check_learn2learn_expressible,
    learn2learn_meta_gradient,
)

__all__ = ["Learn2LearnResult", "check_learn2learn_expressible", "learn2learn_meta_gradient"]
