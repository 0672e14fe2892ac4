"""A Hugging Face Trainer script as a user writes it: a small PreTrainedModel computing its own loss, dict features,
gradient_accumulation_steps=2, on the CPU. With `--kwargs` its forward takes **kwargs: the Trainer (transformers
5.x) then assumes the model normalises its loss by `num_items_in_batch` and leaves it undivided; this model ignores
it, so each optimizer step sums two batch means (`loss *= 1`, accelerate's `loss / 1`: the root is the
cross-entropy times 1)."""
import os
import sys

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments


class TinyConfig(PretrainedConfig):
    model_type = "tiny-mlp"


class Tiny(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def _loss(self, x, labels):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class TinyKwargs(Tiny):
    def forward(self, x=None, labels=None, **kwargs):
        return self._loss(x, labels)


class TinyPlain(Tiny):
    def forward(self, x=None, labels=None):
        return self._loss(x, labels)


g = torch.Generator().manual_seed(0)
data = [{"x": torch.randn(8, generator=g), "labels": int(torch.randint(0, 2, (1,), generator=g))} for _ in range(2048)]
model = (TinyKwargs if "--kwargs" in sys.argv else TinyPlain)(TinyConfig())
args = TrainingArguments(output_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                         per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=200, use_cpu=True,
                         report_to=[], logging_steps=50, save_strategy="no", dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=data).train()
