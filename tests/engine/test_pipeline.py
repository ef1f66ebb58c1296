"""The DP pipeline's arithmetic, with the real grad samplers."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from scipy import stats
from torch import nn

import dpcore
from dpcore.errors import GradSampleError, PrivacyEngineError
from dpcore.registry import get_registry

from .conftest import dataset, grad_sampler_names, loader, mlp

pytestmark = pytest.mark.usefixtures("accountant_name")


def _private(model, opt, dl, accountant_name, **kw):
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1e9)
    kw.setdefault("seed", 0)
    return engine, *engine.make_private(module=model, optimizer=opt, data_loader=dl, **kw)


@pytest.mark.parametrize("mode", grad_sampler_names())
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_noiseless_unclipped_step_equals_non_private_step(mode, opt_cls, accountant_name):
    ds = dataset(32)
    # q = 1: the Poisson batch is the whole data set, so expected == realised batch size
    reference = mlp()
    private = copy.deepcopy(reference)
    ref_opt = opt_cls(reference.parameters(), lr=0.1)
    _engine, model, opt, dl = _private(
        private,
        opt_cls(private.parameters(), lr=0.1),
        loader(ds, 32),
        accountant_name,
        grad_sample_mode=mode,
    )
    for _ in range(2):
        ((x, y),) = list(dl)
        assert len(x) == 32
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for (n, a), b in zip(private.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)


def test_mean_reduction_divides_by_expected_not_realised_batch(accountant_name):
    ds = dataset(40)
    reference = mlp()
    private = copy.deepcopy(reference)
    _engine, model, opt, dl = _private(
        private, torch.optim.SGD(private.parameters(), lr=0.0), loader(ds, 10), accountant_name
    )
    x, y = next(iter(dl))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    for p, r in zip(private.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad * 10.0, r.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_on_zero_gradients(secure, accountant_name):
    torch.manual_seed(0)
    model = nn.Linear(100, 100, bias=False)
    ds = dataset(50, d_in=100)
    sigma, clip = 1.5, 2.0
    engine = dpcore.PrivacyEngine(accountant=accountant_name, secure_mode=secure)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader(ds, 10),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        seed=None if secure else 3,
    )
    x, _ = next(iter(dl))
    opt.zero_grad()
    (model(x) * 0.0).sum().backward()
    opt.step()
    noise = model.weight.grad.flatten().double() * 10.0  # undo ÷ expected batch size (q·N = 10)
    n = noise.numel()
    expected_sd = sigma * clip
    chi2 = (n - 1) * noise.var().item() / expected_sd**2
    p_var = 2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1))
    assert p_var > 1e-3, (noise.std().item(), expected_sd)
    assert abs(noise.mean().item()) < 4 * expected_sd / math.sqrt(n)
    assert stats.kstest(noise.numpy() / expected_sd, "norm").pvalue > 1e-3
    # the same test has power: a 10% error in the std is rejected
    chi2_wrong = (n - 1) * noise.var().item() / (1.1 * expected_sd) ** 2
    assert stats.chi2.cdf(chi2_wrong, n - 1) < 1e-6


@pytest.mark.filterwarnings("ignore:the optimizer stepped without a batch")
def test_seeded_noise_is_reproducible_and_secure_is_not(accountant_name):
    def grads(seed, secure=False):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        engine = dpcore.PrivacyEngine(accountant=accountant_name, secure_mode=secure)
        model, opt, _dl = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=loader(dataset(8, d_in=4), 4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=seed,
        )
        opt.zero_grad()
        (model(torch.ones(2, 4)) * 0).sum().backward()
        opt.step()
        return model.weight.grad.clone()

    torch.testing.assert_close(grads(5), grads(5), rtol=0, atol=0)
    assert not torch.equal(grads(5), grads(6))
    assert not torch.equal(grads(None, secure=True), grads(None, secure=True))


@pytest.mark.parametrize("clipping", ["flat", "automatic", "adaptive", "per_layer"])
def test_no_clipped_contribution_exceeds_the_bound(clipping):
    """Each sample alone, through the real pipeline: its contribution is within the bound,
    and the contributions add up to the batch's clipped sum."""
    registry = get_registry()
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(12, 6) * 50  # large gradients: every sample is clipped
    y = torch.randint(0, 3, (12,))
    gs = registry.create("grad_sampler", "hooks")
    gs.attach(model, loss_reduction="sum")
    clipper = registry.create(
        "clipper", clipping, max_grad_norm=0.5, parameter_names=list(gs.named_parameters())
    )
    opt = dpcore.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        grad_sampler=gs,
        clipper=clipper,
        noise=registry.create("noise", "gaussian"),
        noise_multiplier=0.0,
        expected_batch_size=1.0,
        loss_reduction="sum",
    )
    contributions = []
    for i in range(12):
        bound = clipper.sensitivity()  # adaptive moves it after every step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        opt.step()
        flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert flat.norm() <= bound * (1 + 1e-5)
        assert flat.norm() >= 0.5 * bound  # really clipped down, not zeroed
        contributions.append(flat)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    if clipping != "adaptive":  # adaptive moved its bound after each step
        whole = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(whole, torch.stack(contributions).sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("physical", [1, 3, 7])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_batch_memory_manager_gives_the_update_of_one_big_batch(physical, sigma, accountant_name):
    ds = dataset(60)

    def run(max_physical):
        model = mlp()
        engine = dpcore.PrivacyEngine(accountant=accountant_name)
        model, opt, dl = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=loader(ds, 12),
            noise_multiplier=sigma,
            max_grad_norm=0.3,
            seed=11,
        )
        sizes = []
        if max_physical is None:
            for x, y in dl:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sizes.append(len(x))
        else:
            with dpcore.BatchMemoryManager(
                data_loader=dl, max_physical_batch_size=max_physical, optimizer=opt
            ) as physical_loader:
                for x, y in physical_loader:
                    assert len(x) <= max_physical
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    sizes.append(len(x))
        return [p.detach().clone() for p in model.parameters()], engine, sizes

    big, big_engine, big_sizes = run(None)
    small, small_engine, small_sizes = run(physical)
    assert sum(big_sizes) == sum(small_sizes)
    assert big_engine.steps == small_engine.steps == len(big_sizes) == 5
    assert big_engine.accountant.history == small_engine.accountant.history
    for a, b in zip(big, small, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_over_backward_passes_of_one_batch(accountant_name):
    """Splitting one batch over several backward passes by hand equals one pass."""
    ds = dataset(24)
    results = []
    for chunks in (1, 3):
        model = mlp()
        engine = dpcore.PrivacyEngine(accountant=accountant_name)
        model, opt, dl = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=loader(ds, 24),
            noise_multiplier=0.7,
            max_grad_norm=0.2,
            seed=2,
        )
        x, y = next(iter(dl))
        opt.zero_grad()
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            # mean over the chunk, re-weighted: the chunks' per-sample gradients are unchanged
            nn.functional.cross_entropy(model(xc), yc).backward()
        assert opt.backward_passes == chunks - 1  # flushed by the next forward; the last at step
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert engine.accountant.history == [(0.7, 1.0, 1)]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_accumulating_several_drawn_batches_is_accounted_as_their_composition(accountant_name):
    ds = dataset(40)
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(ds, 10),
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        seed=0,
    )
    opt.zero_grad()
    batches = iter(dl)
    for _ in range(3):
        x, y = next(batches)
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    # one noise draw of std σC over 3 independent Poisson batches = post-processing of
    # 3 releases with std σC/√3: 3 events at σ/√3
    ((sigma, q, steps),) = engine.accountant.history
    assert steps == 3 and q == pytest.approx(0.25)
    assert sigma == pytest.approx(1.2 / math.sqrt(3))


@pytest.mark.filterwarnings("ignore:the optimizer stepped without a batch")
def test_forgetting_zero_grad_is_an_error(accountant_name):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, _dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(16), 16),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        seed=0,
    )
    x, y = dataset(16).tensors
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyEngineError, match="zero_grad"):
        opt.step()
    # model.zero_grad() is as good as optimizer.zero_grad()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_parameter_made_trainable_after_make_private_is_refused(accountant_name):
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, _dl = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader(dataset(16), 8),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        seed=0,
    )
    model[0].weight.requires_grad_(True)
    x, y = dataset(16).tensors
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyEngineError, match=r"'0\.weight'.*no per-sample gradients"):
        opt.step()


def test_parameter_used_outside_its_module_is_refused(accountant_name):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(nn.functional.linear(x, self.a.weight))  # bypasses self.a

    model = Tied()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(8, d_in=4, classes=2), 8),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        seed=0,
    )
    x, y = next(iter(dl))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(GradSampleError, match=r"a\.weight"):
        opt.step()


def test_optimizer_over_foreign_parameters_is_refused(accountant_name):
    model, other = mlp(), mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    with pytest.raises(PrivacyEngineError, match="does not own"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
            data_loader=loader(dataset(8), 4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_lr_scheduler_and_param_groups_are_shared(accountant_name):
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=inner,
        data_loader=loader(dataset(16), 8),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        seed=0,
    )
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.25)
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.25)


def test_noise_hook_sees_noised_sums_before_scaling(accountant_name):
    model = nn.Linear(3, 2)
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader(dataset(20, d_in=3, classes=2), 5),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
    )
    seen = []
    opt.register_noise_hook(
        lambda sums, step: seen.append((step, {k: v.clone() for k, v in sums.items()}))
    )
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(seen[-1][1]["weight"] / 5.0, model.weight.grad)


@pytest.mark.filterwarnings("ignore:the optimizer stepped without a batch")
@pytest.mark.parametrize("mode", grad_sampler_names())
def test_empty_poisson_batch_takes_a_noisy_step(mode, accountant_name):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, _dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader(dataset(8, d_in=4, classes=2), 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
        grad_sample_mode=mode,
    )
    x = torch.zeros(0, 4)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert engine.steps == 1 and len(engine.accountant.history) == 1
    assert not torch.equal(model.weight.detach(), before)  # noise only, but a step
    # skipping forward/backward for an empty batch is just as fine
    opt.zero_grad()
    opt.step()
    assert engine.steps == 2


def test_stepping_on_batches_of_the_original_loader_warns(accountant_name):
    ds = dataset(24)
    original = loader(ds, 8)
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=original,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with pytest.warns(UserWarning, match="not the original data loader"):
        for x, y in original:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
