"""DPTrainer: Poisson logical batches over gradient accumulation, one accounted step per
logical batch, epsilon in the logs, stop at the budget, exact resume on CPU."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, VOCAB

pytest.importorskip("accelerate")

from dpcore_transformers import DPTrainer, PrivacyArguments
from dpcore_transformers.trainer import ENGINE_FILE
from transformers import TrainingArguments, default_data_collator

N = 24


class Texts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (N, 8), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_trainer(tmp_path, privacy: PrivacyArguments, **overrides) -> DPTrainer:  # type: ignore[no-untyped-def]
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip
    args.update(overrides)
    return DPTrainer(
        model=FAMILIES["gpt2"].build(), args=TrainingArguments(**args), train_dataset=Texts(),
        data_collator=default_data_collator, privacy=privacy,
    )  # fmt: skip


def test_trains_one_accounted_step_per_logical_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = make_trainer(tmp_path, PrivacyArguments(noise_multiplier=1.0, seed=0))
    before = trainer.model.transformer.h[0].attn.c_attn.weight.detach().clone()
    seen: list[int] = []
    real_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        seen.append(int(inputs["input_ids"].shape[0]) if inputs else 0)
        return real_step(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step  # type: ignore[method-assign]
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 2 * 4  # 2 epochs x ceil(24 / (3 * 2)) logical batches
    assert trainer.engine.steps == steps and len(trainer.engine.accountant) == steps
    assert trainer.engine.sample_rate == pytest.approx(1 / 4)
    assert len(seen) == 2 * steps  # two micro-batches per logical batch
    assert trainer.optimizer.optimizer.last_step_batches == 1
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1] == pytest.approx(trainer.engine.get_epsilon(1e-5))
    assert not torch.equal(before, trainer.model.transformer.h[0].attn.c_attn.weight)


def test_stops_before_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = PrivacyArguments(noise_multiplier=1.5, epsilon_budget=4.0, seed=0, accountant="rdp")
    trainer = make_trainer(tmp_path, privacy, num_train_epochs=20)
    trainer.train()
    eps = trainer.engine.get_epsilon(1e-5)
    assert 0 < trainer.state.global_step < 20 * 4
    assert eps <= 4.0
    # one more step would have exceeded it
    import copy

    acc = copy.deepcopy(trainer.engine.accountant)
    acc.step(noise_multiplier=1.5, sample_rate=trainer.engine.sample_rate)
    assert acc.get_epsilon(1e-5) > 4.0


def test_resume_is_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = PrivacyArguments(noise_multiplier=1.0, seed=5)
    kw = dict(save_strategy="steps", save_steps=3, num_train_epochs=2)
    full = make_trainer(tmp_path / "a", privacy, **kw)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / ENGINE_FILE).is_file()
    state = torch.load(ckpt / ENGINE_FILE, weights_only=True)
    assert state["steps"] == 3

    resumed = make_trainer(tmp_path / "b", privacy, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == full.state.global_step
    assert resumed.engine.steps == full.engine.steps
    assert resumed.engine.get_epsilon(1e-5) == pytest.approx(full.engine.get_epsilon(1e-5))
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def test_lora_under_bf16(tmp_path) -> None:  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        FAMILIES["gpt2"].build(),
        peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=1, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = DPTrainer(
        model=model, args=args, train_dataset=Texts(), data_collator=default_data_collator,
        privacy=PrivacyArguments(noise_multiplier=1.0, seed=0),
    )  # fmt: skip
    trainer.train()
    assert trainer.engine.steps == trainer.state.global_step == 3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    gs = trainer.engine.grad_sampler
    assert gs.named_parameters() and all("lora_" in n for n in gs.named_parameters())


def test_target_epsilon_is_spent_over_max_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = PrivacyArguments(target_epsilon=3.0, seed=0, accountant="rdp")
    trainer = make_trainer(tmp_path, privacy, max_steps=6)
    trainer.train()
    assert trainer.state.global_step == 6
    assert trainer.engine.get_epsilon(1e-5) == pytest.approx(3.0, rel=0.05)


class Labelled(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        self.ids = torch.randint(1, VOCAB, (N, 8), generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.y[i]}


def test_sequence_classification_uses_the_models_own_loss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = DPTrainer(
        model=FAMILIES["bert"].build(), args=args, train_dataset=Labelled(),
        data_collator=default_data_collator, privacy=PrivacyArguments(noise_multiplier=1.0),
    )  # fmt: skip
    assert not trainer._causal_lm
    trainer.train()
    assert trainer.engine.steps == trainer.state.global_step == 6
