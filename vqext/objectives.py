"""What training minimises, and how fast: the loss terms, input noise and learning-rate schedule.

All of it is configured by :class:`~vqext.config.RunConfig` fields (CLI flags of ``run`` and
``sweep``); with their defaults training is the log's: constant learning rate, plain MSE.

* ``input_noise``: Gaussian noise of that std (normalised units) is added to the training inputs
  (targets stay clean), so the model learns to read slightly wrong inputs, which is what it gets
  from its own predictions in a regressive forecast.
* ``last_weight`` / ``last_k``: the loss adds ``last_weight x`` the MSE over the last ``last_k``
  steps of each window, the steps with nearly full context, which are the ones a rollout uses.
* ``pushforward``: after the ordinary pass, the model runs again on its own one-step predictions
  (detached: the first input is the true one, then the previous pass's predictions) and that
  pass's MSE is added, once per pass. It teaches the model to continue from its own output.
* ``direct_target``: for a model with a direct multi-step head (trained when the run has a
  horizon), the MSE of its ``H`` direct predictions against the ``H`` values after the window is
  added, computed in the same forward pass as the one-step outputs.
* ``loss``: every term above measures the mean squared error (``mse``) or the mean absolute
  error (``mae``, closer to the scale-free MASE and sMAPE that forecasts are judged by).
* ``lr_schedule``: ``constant``, or ``cosine`` decay to 0 after a linear warmup over ``warmup``
  x all steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = int(cfg.warmup * total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def input_noise(shape, std: float, generator: torch.Generator) -> torch.Tensor | None:
    """Gaussian noise of ``std`` drawn from ``generator`` (a CPU generator, so runs are
    reproducible and resumable), or None when ``std`` is 0."""
    if not std:
        return None
    return std * torch.randn(shape, generator=generator)


def _error(cfg):
    return F.l1_loss if getattr(cfg, "loss", "mse") == "mae" else F.mse_loss


def _aux(model) -> torch.Tensor | None:
    aux = getattr(model, "aux_loss", None)  # hard VQ: codebook + commitment loss of the last forward
    return aux if isinstance(aux, torch.Tensor) and aux.requires_grad else None


def training_loss(model, x: torch.Tensor, y: torch.Tensor, start_pos, cfg, aux_source=None,
                  direct_target: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch ``x``, ``y`` ``(B, T, 1)`` under ``cfg``'s objective.

    ``model`` is what runs the forward (a DistributedDataParallel wrapper under torchrun);
    ``aux_source`` is the module that carries ``aux_loss`` (the unwrapped model), default ``model``.
    ``direct_target`` ``(B, H, 1)``: the values after each window, for the model's direct head.
    """
    error = _error(cfg)
    if not getattr(model if aux_source is None else aux_source, "one_step", True):
        # A direct-only model: its forecast is all there is to score.
        loss = error(model(x, start_pos=start_pos, direct=True)[1].float(), direct_target)
        aux = _aux(model if aux_source is None else aux_source)
        return loss if aux is None else loss + aux
    if direct_target is not None:
        pred, ahead = model(x, start_pos=start_pos, direct=True)
        pred = pred.float()
        loss = error(pred, y) + error(ahead.float(), direct_target)
    else:
        pred = model(x, start_pos=start_pos).float()
        loss = error(pred, y)
    aux = _aux(model if aux_source is None else aux_source)
    if aux is not None:
        loss = loss + aux
    if cfg.last_weight:
        k = min(cfg.last_k, y.shape[1])
        loss = loss + cfg.last_weight * error(pred[:, -k:], y[:, -k:])
    for _ in range(cfg.pushforward):
        fed = torch.cat((x[:, :1], pred.detach()[:, :-1].to(x.dtype)), 1)
        pred = model(fed, start_pos=start_pos).float()
        loss = loss + error(pred, y)
    return loss
