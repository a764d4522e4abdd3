"""An exponential moving average of a model's weights, for sampling and evaluation.

Generators trained with noisy per-batch objectives (IMLE's nearest-sample loss, GAN-free
models in general) sample better from an average of their recent weights than from the
last step's: the average smooths the step-to-step jitter the optimizer leaves. `fit`
keeps one when asked (`--ema DECAY`), evaluates and writes its pictures with it, stores
it in the checkpoint, and `model_from_checkpoint` loads it for sampling.
"""
import contextlib

import torch


def check_decay(decay):
    """A decay in (0, 1) as a float, or a ValueError naming it."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be a number in (0, 1), got {decay!r}")
    return float(decay)


class WeightAverage:
    """avg <- decay_t avg + (1 - decay_t) weights after every optimizer step, over the
    model's floating-point parameters (buffers -- batch-norm statistics, IMLE's search
    state -- are the live model's). decay_t = min(decay, (1 + t) / (10 + t)) so that the
    first steps are not averaged with the random initialisation."""

    def __init__(self, model, decay):
        self.decay = check_decay(decay)
        self.steps = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - d)
        self.steps += 1

    def state_dict(self):
        return {"decay": self.decay, "steps": self.steps, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state):
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"the checkpoint's weight average does not match the model (parameters {sorted(missing)[:3]})")
        self.steps = int(state["steps"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, model):
        """The averaged weights in `model` for the duration of the block, then its own back."""
        params = dict(model.named_parameters())
        saved = {k: params[k].detach().clone() for k in self.shadow}
        try:
            with torch.no_grad():
                for k, v in self.shadow.items():
                    params[k].copy_(v)
            yield model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)


def load_average(model, state):
    """Put a checkpoint's weight average (WeightAverage.state_dict()) into `model`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["shadow"].items():
            if k not in params:
                raise ValueError(f"the checkpoint's weight average names a parameter the model lacks: {k}")
            params[k].copy_(v)
    return model

