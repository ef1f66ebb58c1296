"""engine.save_checkpoint / load_checkpoint in one process: schedulers, extras, refusals."""

from __future__ import annotations

import os

import pytest
import resume_worker as w  # this folder is on sys.path (conftest.py)
import torch

from dpcore.checkpoint import FORMAT_VERSION, read_checkpoint
from dpcore.errors import CheckpointError

CASE = {"config": w.base_config()}


def _with_scheduler():
    engine, model, optimizer, loader = w.setup(CASE)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return engine, model, optimizer, loader, scheduler


def _train(engine, model, optimizer, loader, scheduler, steps):
    while engine.steps < steps:
        before = engine.steps
        w.train_until(CASE, engine, model, optimizer, loader, before + 1)
        scheduler.step()


def test_scheduler_and_extra_data_round_trip(tmp_path):
    ref = _with_scheduler()
    _train(*ref, steps=8)
    first = _with_scheduler()
    _train(*first, steps=3)
    first[0].save_checkpoint(
        path=tmp_path / "c.pt",
        module=first[1],
        optimizer=first[2],
        data_loader=first[3],
        lr_scheduler=first[4],
        epoch=0,
        note="hello",
        history=[1.5, 2.5],
    )
    second = _with_scheduler()
    extra = second[0].load_checkpoint(
        path=tmp_path / "c.pt",
        module=second[1],
        optimizer=second[2],
        data_loader=second[3],
        lr_scheduler=second[4],
    )
    assert extra == {"epoch": 0, "note": "hello", "history": [1.5, 2.5]}
    assert second[4].last_epoch == 3
    _train(*second, steps=8)
    assert second[2].param_groups[0]["lr"] == ref[2].param_groups[0]["lr"]
    for (name, p), q in zip(ref[1].named_parameters(), second[1].parameters(), strict=True):
        assert torch.equal(p, q), name


def test_checkpoint_names_parameters_as_the_users_model(tmp_path):
    engine, model, optimizer, loader = w.setup(CASE)
    engine.save_checkpoint(
        path=tmp_path / "c.pt", module=model, optimizer=optimizer, data_loader=loader
    )
    data = read_checkpoint(tmp_path / "c.pt")
    assert data["dpcore_checkpoint"] == FORMAT_VERSION
    assert set(data["module"]) == set(w.make_model().state_dict())
    plain = w.make_model()
    plain.load_state_dict(data["module"])  # loads into a non-private model as is


def test_engine_refuses_a_crafted_pickle_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    engine, model, optimizer, _loader = w.setup(CASE)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    good = torch.load(tmp_path / "c.pt", weights_only=True)
    good["extra"] = {"x": Payload()}
    torch.save(good, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled objects"):
        engine.load_checkpoint(path=tmp_path / "evil.pt", module=model, optimizer=optimizer)
    assert not (tmp_path / "PWNED").exists()


def test_config_difference_is_named_before_make_private_too(tmp_path):
    import dpcore
    from dpcore.config import EngineConfig

    engine, model, optimizer, _loader = w.setup(CASE)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    other = EngineConfig.from_dict(w.base_config(max_grad_norm=0.7))
    fresh = dpcore.PrivacyEngine.from_config(other)
    plain, opt = w.make_model(), None
    opt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    fresh.load_checkpoint(path=tmp_path / "c.pt", module=plain, optimizer=opt)
    with pytest.raises(CheckpointError, match=r"max_grad_norm: checkpoint 0\.5, engine 0\.7"):
        fresh.make_private(
            module=plain,
            optimizer=opt,
            data_loader=torch.utils.data.DataLoader(w.make_data(), batch_size=8),
        )


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    import dpcore.distributed

    engine, model, optimizer, _loader = w.setup(CASE)
    monkeypatch.setattr(dpcore.distributed, "rank", lambda: 1)
    assert engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer) is None
    assert not (tmp_path / "c.pt").exists()
    monkeypatch.setattr(dpcore.distributed, "rank", lambda: 0)
    assert engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    assert (tmp_path / "c.pt").exists()


def test_config_change_before_make_private_refused_or_composed(tmp_path):
    import dpcore
    from dpcore.config import EngineConfig
    from dpcore.registry import get_registry

    engine, model, optimizer, loader = w.setup(CASE)
    w.train_until(CASE, engine, model, optimizer, loader, 4)
    engine.save_checkpoint(
        path=tmp_path / "c.pt", module=model, optimizer=optimizer, data_loader=loader
    )

    def fresh(**overrides):
        eng = dpcore.PrivacyEngine.from_config(EngineConfig.from_dict(w.base_config(**overrides)))
        plain = w.make_model()
        return eng, plain, torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)

    eng, plain, opt = fresh(accountant={"name": "gdp"})
    with pytest.raises(CheckpointError, match="accountant: checkpoint"):
        eng.load_checkpoint(path=tmp_path / "c.pt", module=plain, optimizer=opt)

    eng, plain, opt = fresh(accountant={"name": "prv"}, noise_multiplier=1.5)
    eng.load_checkpoint(
        path=tmp_path / "c.pt", module=plain, optimizer=opt, allow_config_change=True
    )
    case = {"config": w.base_config(accountant={"name": "prv"}, noise_multiplier=1.5)}
    plain, opt, loader = eng.make_private(
        module=plain,
        optimizer=opt,
        data_loader=torch.utils.data.DataLoader(w.make_data(), batch_size=8),
    )
    assert eng.steps == 4
    w.train_until(case, eng, plain, opt, loader, 7)
    assert eng.accountant.history == [(0.8, 0.2, 4), (1.5, 0.2, 3)]
    both = get_registry().create("accountant", "prv")
    both.load_state_dict({"name": "prv", "history": [[0.8, 0.2, 4], [1.5, 0.2, 3]]})
    assert eng.get_epsilon(1e-5) == both.get_epsilon(1e-5)


def test_saving_inside_a_step_is_refused(tmp_path):
    case = {"config": w.base_config(), "max_physical_batch_size": 3}
    engine, model, optimizer, _loader = w.setup(case)
    x, y = w.make_data().tensors
    torch.nn.CrossEntropyLoss()(model(x[:4]), y[:4]).backward()
    with pytest.raises(CheckpointError, match="middle of a step"):
        engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    optimizer.signal_skip_step(True)  # a virtual step: clipped sums kept for the next one
    optimizer.step()
    with pytest.raises(CheckpointError, match="middle of a step"):
        engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    optimizer.step()  # the real step
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    assert not list(tmp_path.glob("*.tmp*")) and (tmp_path / "c.pt").exists()
