"""What both self-training mitigations share: a copy of the fitted model fine-tuned on its own samples.

Neon (simulator.mitigations.neon) merges that copy's weights with the model's; SIMS (simulator.mitigations.
sims) keeps it as the auxiliary network of negative guidance. Both draw the copy's training set with the
run's sampler (sample.temperature, sample.guidance: "your usual inference", Alemohammad et al. 2025), from
the mitigation's own seed stream, so the step is a function of (seed, generation) and of the fitted model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from simulator.data.base import draw_labels
from simulator.options import ConfigError


def self_samples(
    model: Any, n: int, generator: torch.Generator, *, bias: Mapping[str, Any] | None = None,
    real_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """n samples (C, n, ...) of model with the run's sampling options `bias`; for a class-conditional
    model, labels (C, n) drawn from the real labels' proportions `real_labels` (n,) first, from generator."""
    labels = None if real_labels is None else draw_labels(real_labels, n, generator)
    x = model.sample(n, labels, generator=generator, **dict(bias or {})).cpu()
    return x, None if labels is None else labels.unsqueeze(0).expand(x.shape[0], -1)


def fine_tuned_copy(
    model: Any, make_model: Callable[[], Any], x: torch.Tensor, labels: torch.Tensor | None, *, steps: int,
    lr: float | None, generator: torch.Generator,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A new model of the family holding model's state, fitted `steps` steps on (x, labels) from generator
    (a closed form refits: its fine-tune is the fully trained limit); lr: the fine-tune's learning rate
    (None: the family's). Returns the copy and its fit's statistics."""
    copy = make_model()
    copy.load_state_dict(model.state_dict())
    if lr is not None:
        if not hasattr(copy, "lr"):
            raise ConfigError(f"mitigation: lr is for the torch families; {type(model).__name__} fits in "
                              "closed form (set lr to null)")  # fmt: skip
        copy.lr = float(lr)
    stats = copy.fit(x, labels, steps=steps, generator=generator, progress=False)
    return copy, stats


def real_labels(pool: Any) -> torch.Tensor | None:
    """The real training labels (n,) a conditional run's self-samples are drawn in proportion to."""
    return pool.data.train_labels[0] if getattr(pool, "conditional", False) else None


def last_loss(stats: Mapping[str, Any]) -> float | None:
    """The fine-tune's loss over its last steps, where the family reports one (torch families)."""
    value = stats.get("loss_last")
    return None if value is None else float(value)
