"""``DPTrainer``: ``transformers.Trainer`` with dpcore's DP-SGD.

A subclass (not a callback plus a collator) because four things must change
together and a callback can reach none of them: the training data loader
(Poisson sampling), the optimizer (made private), the per-micro-batch loss and
backward (no division by the accumulation steps, per-sample token means) and the
checkpoint files (the engine's state next to the optimizer's). Users swap one
class name and add one argument::

    trainer = DPTrainer(model=model, args=args, train_dataset=train,
                        privacy=PrivacyArguments(target_epsilon=8.0, max_grad_norm=1.0))
    trainer.train()

**Batches.** A *logical* batch is one Poisson draw at rate
``q = 1 / ceil(N / (per_device_train_batch_size * gradient_accumulation_steps))``.
Each is split into ``gradient_accumulation_steps`` micro-batches (sizes as even as
possible, possibly empty), which the Trainer's accumulation loop runs before its one
``optimizer.step()``: one logical batch = one optimizer step = one accounted step.

**Stopping.** With ``epsilon_budget`` (default: ``target_epsilon``) training stops
before a step would spend more than the budget. Epsilon is logged with the
Trainer's metrics (key ``epsilon``).

**Checkpoints.** ``dpcore_engine.pt`` (accountant, sampler position, noise
generator; plain data) is written next to the Trainer's ``optimizer.pt``, and
restored by ``trainer.train(resume_from_checkpoint=...)``; the Trainer's data
skipping is turned off because the sampler resumes at its own position.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

import dpcore
from dpcore.errors import CheckpointError, PrivacyEngineError

from .losses import causal_lm_loss, has_per_sample_lm_loss, use_per_sample_loss

logger = logging.getLogger(__name__)

ENGINE_FILE = "dpcore_engine.pt"


@dataclass
class PrivacyArguments:
    """The privacy side of a :class:`DPTrainer` run."""

    noise_multiplier: float | None = None  #: or give target_epsilon
    target_epsilon: float | None = None  #: calibrate the noise to spend this over the epochs
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None  #: stop before exceeding it (default: target_epsilon)
    grad_sample_mode: str = "bk"
    accountant: str = "prv"
    clipping: str = "flat"
    seed: int | None = None
    loss_reduction: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict)  #: more make_private keywords


class _MicroBatches:
    """The training loader: each logical (Poisson) batch as ``accumulation`` micro-batches.

    Lazy: the Trainer asks for ``len()`` before it builds the optimizer (and so
    before ``make_private`` creates the sampler)."""

    def __init__(self, trainer: DPTrainer, dataset: Any, collate: Any) -> None:
        self.trainer, self.dataset, self.collate = trainer, dataset, collate
        self.accumulation = max(1, int(trainer.args.gradient_accumulation_steps))
        self.batch_size = trainer.args.per_device_train_batch_size

    def logical_batch_size(self) -> int:
        return self.batch_size * self.accumulation

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.logical_batch_size())

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.accumulation

    def __iter__(self) -> Any:
        loader = self.trainer.private_loader
        if loader is None:
            raise PrivacyEngineError("DPTrainer: the model is not private yet (no optimizer)")
        for _ in range(2):  # a resume at the very end of an epoch starts the next one
            delivered = False
            for samples in loader:
                delivered = True
                n = len(samples)
                bounds = [round(i * n / self.accumulation) for i in range(self.accumulation + 1)]
                for lo, hi in itertools.pairwise(bounds):
                    chunk = samples[lo:hi]
                    yield self.collate(chunk) if chunk else {}
            if delivered:
                return


class _PrivacyCallback(TrainerCallback):
    """Stops before the budget is exceeded (checked before every step)."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def _check(self, control: Any) -> Any:
        if self.trainer.steps_left() <= 0:
            control.should_training_stop = True
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._check(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._check(control)


class DPTrainer(Trainer):
    """``transformers.Trainer`` training privately with dpcore (see the module docs)."""

    def __init__(self, *args: Any, privacy: PrivacyArguments | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise PrivacyEngineError(
                "DPTrainer runs in one process; for data-parallel private training use "
                "dpcore.DPDDP with a plain training loop (docs/distributed.md)"
            )
        self.privacy = privacy or PrivacyArguments()
        if self.privacy.noise_multiplier is None and self.privacy.target_epsilon is None:
            raise PrivacyEngineError("PrivacyArguments: give noise_multiplier or target_epsilon")
        # Trainer's own clipping of the (noised) gradient is not DP clipping: off. The
        # sampler resumes at its saved position: no data skipping by the Trainer.
        self.args.max_grad_norm = 0.0
        self.args.ignore_data_skip = True
        self.engine = dpcore.PrivacyEngine(accountant=self.privacy.accountant)
        self.private_loader: Any = None
        assert self.model is not None, "DPTrainer needs a model"
        self._causal_lm = has_per_sample_lm_loss(use_per_sample_loss(self.model))
        self.add_callback(_PrivacyCallback(self))

    # -- data ---------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset.")
        dataset = self.train_dataset
        collate = self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collate = self._get_collator_with_removed_columns(collate, description="training")
        except ImportError:
            pass
        self._train_data = dataset
        self._micro = _MicroBatches(self, dataset, collate)
        return self._micro

    # -- the optimizer ----------------------------------------------------------------------
    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        if self.engine.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(*args, **kwargs)
        micro = getattr(self, "_micro", None) or self.get_train_dataloader()
        base = DataLoader(micro.dataset, batch_size=micro.logical_batch_size(), collate_fn=list)
        p = self.privacy
        common = dict(
            module=self.model,
            optimizer=optimizer,
            data_loader=base,
            max_grad_norm=p.max_grad_norm,
            grad_sample_mode=p.grad_sample_mode,
            clipping=p.clipping,
            seed=p.seed if p.seed is not None else self.args.seed,
            loss_reduction=p.loss_reduction,
            wrap_model=False,  # the Trainer keeps its model object
            **p.extra,
        )
        if p.noise_multiplier is not None:
            _, dp_optimizer, loader = self.engine.make_private(
                noise_multiplier=p.noise_multiplier, **common
            )
        else:
            _, dp_optimizer, loader = self.engine.make_private_with_epsilon(
                target_epsilon=p.target_epsilon,
                target_delta=p.delta,
                epochs=self._planned_epochs(micro),
                **common,
            )
        loader.collate_fn = list  # raw samples; the micro-batches are collated by the Trainer
        self.private_loader = loader
        self.optimizer = dp_optimizer
        return dp_optimizer

    def _planned_epochs(self, micro: _MicroBatches) -> float:
        """Epochs the noise is calibrated for: ``max_steps`` when given, else the epochs."""
        if self.args.max_steps and self.args.max_steps > 0:
            return self.args.max_steps / micro.steps_per_epoch()
        return float(self.args.num_train_epochs)

    # -- one micro-batch -------------------------------------------------------------------
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        """Forward and backward of one micro-batch, *not* divided by the accumulation
        steps: the grad sampler needs each sample's own gradient, and the optimizer
        divides the noised sum by the expected logical batch size."""
        if not inputs:  # an empty micro-batch of a Poisson draw: nothing to do
            return torch.zeros((), device=self.args.device)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss)
        return loss.detach() / max(1, self.args.gradient_accumulation_steps)

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Causal LMs: the mean over samples of each sample's mean token loss, computed
        outside the model (works with every grad-sample mode). Other models: their own
        loss (a mean of per-sample losses), or ``compute_loss_func``."""
        if self.compute_loss_func is not None or not self._causal_lm or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = causal_lm_loss(outputs.logits, labels, reduction=self.privacy.loss_reduction)
        return (loss, outputs) if return_outputs else loss

    # -- privacy spent ----------------------------------------------------------------------
    def epsilon(self) -> float:
        if self.engine.optimizer is None or not len(self.engine.accountant):
            return 0.0
        return self.engine.get_epsilon(self.privacy.delta)

    def budget(self) -> float | None:
        return self.privacy.epsilon_budget or self.privacy.target_epsilon

    def steps_left(self) -> int:
        """Optimizer steps that keep epsilon within the budget (a large number if none)."""
        budget = self.budget()
        if budget is None or self.engine.optimizer is None:
            return 1 << 30
        from dpcore.train import steps_within_budget

        return steps_within_budget(self.engine, budget, self.privacy.delta, 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.engine.optimizer is not None:
            logs = {**logs, "epsilon": self.epsilon()}
        super().log(logs, *args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.engine.optimizer is not None:
            path = os.path.join(output_dir, ENGINE_FILE)
            torch.save(self.engine.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ENGINE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{checkpoint} has no {ENGINE_FILE}: it was not written by DPTrainer, so the "
                "privacy spent and the sampler position are unknown; resume from a DPTrainer "
                "checkpoint or start a new run"
            )
        self.engine.load_state_dict(torch.load(path, weights_only=True))


__all__ = ["ENGINE_FILE", "DPTrainer", "PrivacyArguments"]
