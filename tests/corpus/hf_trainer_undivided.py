# Source: huggingface/transformers, src/transformers/trainer.py, commit 2cda12cbf6e476183e68ec476551fa7e3717394a:
# Trainer._inner_training_loop and Trainer.training_step, as it runs for a model whose forward takes **kwargs
"""The Trainer's inner loop when it does not divide the loss: a model whose `forward` takes `**kwargs` makes the
Trainer assume the model handles `num_items_in_batch` itself, so `training_step` skips
`loss / gradient_accumulation_steps`; a model that ignores it backpropagates two undivided means per step. Each step
consumes exactly what its two backward passes produced, every backward pass over a batch of its own whose root is the
model's cross-entropy mean, not divided by 2: twice the mean gradient. And `tr_loss / steps` reports the sum of two
batch means per step, twice the epoch's mean batch loss (the logged loss doubles): `broken`.

Syncs on CUDA: as hf_trainer.
"""

import loops
from tests.corpus.hf_trainer import CUDA_SYNCS_PER_STEP, inner_loop, workload

__all__ = ["CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "train", "workload"]

EXPECTED_VERDICT = "broken"


def train(run: loops.Run):
    return inner_loop(run, divide=False)
