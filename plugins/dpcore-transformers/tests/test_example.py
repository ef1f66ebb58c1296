"""The GPT-2 + LoRA example: its config loads, and a shortened run of it improves the
validation perplexity of the publicly pretrained model at epsilon <= 8."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("peft")

CONFIG = Path(__file__).parents[3] / "examples" / "gpt2-lora.toml"


def test_data_is_small_and_disjoint() -> None:
    from dpcore_transformers import example

    public, private = example._lines("public.txt"), example._lines("private.txt")
    assert not set(public) & set(private)
    size = sum(len(x) + 1 for x in public + private)
    assert size < 300_000
    train, val = example.weather_reports()
    assert not {tuple(r.tolist()) for r in train.ids} & {tuple(r.tolist()) for r in val.ids}


@pytest.mark.slow
def test_short_private_run_improves_validation_perplexity(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dpcore_transformers import example

    from dpcore.train import TrainConfig, train

    data = tomllib.loads(CONFIG.read_text())
    data["train"]["model_options"]["pretrain_steps"] = 30
    data["epochs"], data["target_epsilon"] = 1, 4.0  # fewer steps, same mechanics
    data["train"]["batch_size"] = 256
    cfg = TrainConfig.from_dict(data)

    _, val = example.weather_reports()
    before = example.perplexity(example.gpt2_lora(pretrain_steps=30), val)
    result = train(cfg, run_dir=tmp_path, progress=False)
    after = example.perplexity(result.model, val)
    assert result.epsilon <= 4.0 + 1e-6
    assert math.isfinite(after) and after < 0.5 * before
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
