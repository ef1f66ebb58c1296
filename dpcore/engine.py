"""``PrivacyEngine``: turns a model, an optimizer and a data loader into private ones.

The engine chooses the plugins (by name, with options), wires them into the
one DP pipeline (:class:`~dpcore.optimizer.DPOptimizer`), owns the accountant,
and holds everything a checkpoint needs. It follows Opacus 1.6's API so that
migrating is mostly a change of import::

    engine = dpcore.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.1, max_grad_norm=1.0)
    ...
    engine.get_epsilon(delta=1e-5)

Every component can also be chosen by plugin name with options, in any of three
spellings: ``"adaptive"``, ``("adaptive", {"target_unclipped_quantile": 0.7})`` or
``{"name": "adaptive", "target_unclipped_quantile": 0.7}``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as _dist
from . import rng
from .config import ComponentConfig, EngineConfig
from .data import DPDataLoader, _require_map_style
from .errors import (
    ConfigError,
    IncompatiblePluginsError,
    PrivacyEngineError,
    UnsupportedModuleError,
)
from .optimizer import DPOptimizer
from .registry import get_registry
from .validate import ModuleValidator
from .wrap import PrivateModule

#: a plugin given by name: "flat", ("adaptive", {...}), {"name": "adaptive", ...}
ComponentSpec = Union[str, tuple[str, Mapping[str, Any]], Mapping[str, Any], ComponentConfig]

STATE_FORMAT = 1


def component(spec: ComponentSpec) -> ComponentConfig:
    """Normalise the three spellings of a plugin choice to a :class:`ComponentConfig`."""
    if isinstance(spec, ComponentConfig):
        return spec
    if isinstance(spec, str):
        return ComponentConfig(name=spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return ComponentConfig(name=spec[0], **dict(spec[1]))
    if isinstance(spec, Mapping) and "name" in spec:
        return ComponentConfig(**dict(spec))
    raise ConfigError(
        f"a component is given as 'name', ('name', {{options}}) or {{'name': ..., **options}}; "
        f"got {spec!r}"
    )


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = (
        obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    )
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _is_empty_batch(args: Any, kwargs: Any, batch_first: bool) -> bool:
    """Whether a forward pass's first tensor input has an empty batch dimension."""
    t = _first_tensor((args, kwargs))
    if t is None or t.dim() == 0:
        return False
    return t.shape[0 if batch_first or t.dim() < 2 else 1] == 0


class PrivacyEngine:
    """Private training for PyTorch: ``make_private``, accounting, state.

    Args:
        accountant: accountant plugin (``"prv"``, ``"rdp"``, ``"gdp"`` or any installed
            one), optionally with options.
        secure_mode: draw noise from the OS's cryptographic source and sampling from an
            unpredictable seed (no ``seed`` or ``noise_generator`` allowed then).
    """

    def __init__(self, accountant: ComponentSpec = "prv", secure_mode: bool = False) -> None:
        self.accountant_config = component(accountant)
        self.secure_mode = bool(secure_mode)
        self.config: EngineConfig | None = None
        self._accountant: Any = None
        self._reset_run()

    def _reset_run(self) -> None:
        self.module: nn.Module | None = None  # the user's model (unwrapped)
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DPDataLoader | None = None
        self.grad_sampler: Any = None
        self.clipper: Any = None
        self.noise: Any = None
        self.sampler: Any = None
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.num_samples: int | None = None
        self.world_size = 1
        self.steps = 0
        self.seed: int | None = None
        self.noise_generator: torch.Generator | None = None
        self.clipper_generator: torch.Generator | None = None
        self._run_config: EngineConfig | None = None
        self._handles: list[Any] = []
        self._pending_state: Mapping[str, Any] | None = None
        self._warned_no_batch = False

    # ------------------------------------------------------------------------------
    # Construction from a config
    # ------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: EngineConfig | Mapping[str, Any], *, secure_mode: bool = False
    ) -> PrivacyEngine:
        """An engine whose ``make_private(module=, optimizer=, data_loader=)`` uses ``config``."""
        cfg = config if isinstance(config, EngineConfig) else EngineConfig.from_dict(config)
        engine = cls(accountant=cfg.accountant, secure_mode=secure_mode)
        engine.config = cfg
        return engine

    @property
    def accountant(self) -> Any:
        """The accountant plugin (created on first use)."""
        if self._accountant is None:
            cfg = self.accountant_config
            self._accountant = get_registry().create("accountant", cfg.name, cfg.options)
        return self._accountant

    @accountant.setter
    def accountant(self, value: Any) -> None:
        self._accountant = value

    # ------------------------------------------------------------------------------
    # make_private
    # ------------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float | None = None,
        max_grad_norm: float | Sequence[float] | None = None,
        batch_first: bool | None = None,
        loss_reduction: str | None = None,
        poisson_sampling: bool = True,
        clipping: ComponentSpec | None = None,
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: ComponentSpec | None = None,
        wrap_model: bool = True,
        noise: ComponentSpec | None = None,
        sampler: ComponentSpec | None = None,
        seed: int | None = None,
        criterion: Any = None,
    ) -> tuple[Any, ...]:
        """Make ``module``, ``optimizer`` and ``data_loader`` private.

        Returns ``(module, optimizer, data_loader)``; if ``criterion`` is given (Opacus'
        ghost-clipping signature) it is returned unchanged as well:
        ``(module, optimizer, criterion, data_loader)``. dpcore's grad samplers need no
        wrapped loss.

        Keywords left as ``None`` come from the engine's config (``from_config``) or
        the defaults: ``grad_sample_mode="hooks"``, ``clipping="flat"``,
        ``noise="gaussian"``, ``sampler="poisson"`` (``"shuffle"`` when
        ``poisson_sampling=False``), ``batch_first=True``, ``loss_reduction="mean"``.
        """
        if (
            noise_multiplier is None
            and self.config is not None
            and self.config.noise_multiplier is None
        ):
            # the config states a budget (target_epsilon, epochs) instead of σ
            return self.make_private_with_epsilon(
                module=module,
                optimizer=optimizer,
                data_loader=data_loader,
                target_epsilon=self.config.target_epsilon,  # type: ignore[arg-type]
                target_delta=self.config.delta,
                epochs=self.config.epochs,  # type: ignore[arg-type]
                max_grad_norm=max_grad_norm,
                batch_first=batch_first,
                loss_reduction=loss_reduction,
                poisson_sampling=poisson_sampling,
                clipping=clipping,
                noise_generator=noise_generator,
                grad_sample_mode=grad_sample_mode,
                wrap_model=wrap_model,
                noise=noise,
                sampler=sampler,
                seed=seed,
                criterion=criterion,
            )
        cfg = self._resolve_config(
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            noise=noise,
            sampler=sampler,
            seed=seed,
        )
        return self._make_private(
            cfg,
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_generator=noise_generator,
            wrap_model=wrap_model,
            criterion=criterion,
            sigma_for=lambda _sampler: float(cfg.noise_multiplier),  # type: ignore[arg-type]
        )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: float | Sequence[float] | None = None,
        batch_first: bool | None = None,
        loss_reduction: str | None = None,
        poisson_sampling: bool = True,
        clipping: ComponentSpec | None = None,
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: ComponentSpec | None = None,
        wrap_model: bool = True,
        noise: ComponentSpec | None = None,
        sampler: ComponentSpec | None = None,
        seed: int | None = None,
        criterion: Any = None,
        epsilon_tolerance: float = 0.01,
    ) -> tuple[Any, ...]:
        """Like :meth:`make_private`, with the noise multiplier calibrated so that
        ``epochs`` epochs spend ``target_epsilon`` at ``target_delta`` (with this
        engine's accountant, sampler and noise)."""
        cfg = self._resolve_config(
            noise_multiplier=None,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            noise=noise,
            sampler=sampler,
            seed=seed,
            target_epsilon=target_epsilon,
            delta=target_delta,
            epochs=epochs,
        )

        def sigma_for(smp: Any) -> float:
            from .accounting import get_noise_multiplier

            separation = max(1, int(getattr(smp, "min_separation", 1)))
            steps = math.ceil(epochs * len(smp) / separation)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=smp.sample_rate,
                    steps=steps,
                    accountant=self.accountant_config.name,
                    epsilon_tolerance=epsilon_tolerance,
                    **self.accountant_config.options,
                )
            )

        return self._make_private(
            cfg,
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_generator=noise_generator,
            wrap_model=wrap_model,
            criterion=criterion,
            sigma_for=sigma_for,
        )

    def _resolve_config(
        self,
        *,
        noise_multiplier: float | None,
        poisson_sampling: bool,
        target_epsilon: float | None = None,
        epochs: float | None = None,
        delta: float | None = None,
        **given: Any,
    ) -> EngineConfig:
        """One EngineConfig from the engine's config, overridden by the keywords given."""
        base: dict[str, Any] = self.config.model_dump() if self.config is not None else {}
        for key in ("noise_multiplier", "target_epsilon", "epochs"):
            base.pop(key, None)
        cfg_sigma = self.config.noise_multiplier if self.config is not None else None
        renames = {"clipping": "clipper", "grad_sample_mode": "grad_sampler"}
        for key, value in given.items():
            if value is None:
                continue
            field = renames.get(key, key)
            if field in ("clipper", "grad_sampler", "noise", "sampler"):
                value = component(value).model_dump()
            if field == "max_grad_norm" and not isinstance(value, (int, float)):
                value = [float(v) for v in value]
            base[field] = value
        if given.get("sampler") is None and not poisson_sampling:
            base["sampler"] = {"name": "shuffle"}
        base["accountant"] = self.accountant_config.model_dump()
        if delta is not None:
            base["delta"] = delta
        if target_epsilon is not None:
            base.update(target_epsilon=target_epsilon, epochs=epochs)
        else:
            sigma = noise_multiplier if noise_multiplier is not None else cfg_sigma
            if sigma is None:
                raise PrivacyEngineError(
                    "make_private needs noise_multiplier (or call make_private_with_epsilon, or "
                    "build the engine with PrivacyEngine.from_config)"
                )
            base["noise_multiplier"] = sigma
        if "max_grad_norm" not in given or given["max_grad_norm"] is None:
            if self.config is None:
                raise PrivacyEngineError("make_private needs max_grad_norm (the clipping bound C)")
        try:
            return EngineConfig.model_validate(base)
        except Exception as exc:
            raise ConfigError(str(exc)) from None

    # ------------------------------------------------------------------------------
    def _make_private(
        self,
        cfg: EngineConfig,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_generator: torch.Generator | None,
        wrap_model: bool,
        criterion: Any,
        sigma_for: Any,
    ) -> tuple[Any, ...]:
        if self.optimizer is not None:
            raise PrivacyEngineError(
                "this engine already made a model private; use one PrivacyEngine per training run "
                "(or call engine.detach() first)."
            )
        if isinstance(optimizer, DPOptimizer):
            raise PrivacyEngineError(
                "the optimizer is already private; pass the original torch optimizer"
            )
        if isinstance(module, PrivateModule):
            raise PrivacyEngineError("the model is already private; pass the original model")
        if not isinstance(data_loader, DataLoader):
            raise PrivacyEngineError(
                f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}"
            )
        _require_map_style(data_loader)
        if self.secure_mode and (cfg.seed is not None or noise_generator is not None):
            raise PrivacyEngineError(
                "secure_mode draws all randomness from the OS's cryptographic source; do not give "
                "a seed or a noise_generator with it."
            )
        _dist.reject_plain_ddp(module)
        inner = _dist.unwrap_model(module)
        # [distributed owner] data-parallel training is asked for by wrapping the model in
        # DPDDP; never inferred from an initialised process group alone.
        distributed = isinstance(module, _dist.DPDDP)
        registry = get_registry()

        # -- the model -----------------------------------------------------------------
        problems = ModuleValidator.validate(inner, grad_sample_mode=cfg.grad_sampler.name)
        if problems:
            raise UnsupportedModuleError(
                "the model cannot be trained privately as it is:\n  - "
                + "\n  - ".join(problems)
                + "\nCall `model = dpcore.ModuleValidator.fix(model)` before creating the optimizer "
                "(it replaces what can be replaced), and fix the rest by hand."
            )
        self._check_optimizer_params(inner, optimizer)

        # -- randomness and distribution ---------------------------------------------------
        num_samples = len(data_loader.dataset)  # type: ignore[arg-type]
        requested_rate = 1.0 / len(data_loader)
        world_size, rank, seed, sampler_name = self._distribution(
            cfg, distributed, data_loader, num_samples, requested_rate
        )

        # -- data ------------------------------------------------------------------------
        smp = registry.create(
            "sampler",
            sampler_name,
            cfg.sampler.options,
            num_samples=num_samples,
            sample_rate=requested_rate,
            generator=rng.make_generator(seed, "sampler", rank),
            rank=rank,
            world_size=world_size,
        )

        # -- pipeline components --------------------------------------------------------------
        noise_options = dict(cfg.noise.options)
        if self.secure_mode:
            fields = registry.get("noise", cfg.noise.name).options
            if fields is None or "secure" not in fields.model_fields:
                raise IncompatiblePluginsError(
                    f"secure_mode needs a noise mechanism with a 'secure' option; "
                    f"{cfg.noise.name!r} has none."
                )
            noise_options["secure"] = True
        noise_plugin = registry.create("noise", cfg.noise.name, noise_options)
        # A sampler may adapt to the separation the noise needs (cyclic_poisson's cycle
        # length defaults to the number of bands); the compatibility check still applies.
        adapt = getattr(smp, "require_separation", None)
        if callable(adapt):
            adapt(int(getattr(noise_plugin, "min_separation", 1)))
        self._check_compatible(cfg, smp, noise_plugin)
        dp_loader = DPDataLoader.from_data_loader(data_loader, sampler=smp)
        sigma = sigma_for(smp)

        gs = registry.create("grad_sampler", cfg.grad_sampler.name, cfg.grad_sampler.options)
        gs.attach(inner, batch_first=cfg.batch_first, loss_reduction=cfg.loss_reduction)
        try:
            clipper = registry.create(
                "clipper",
                cfg.clipper.name,
                cfg.clipper.options,
                max_grad_norm=cfg.max_grad_norm,
                parameter_names=list(gs.named_parameters()),
            )
            first = next(iter(gs.named_parameters().values()), None)
            device = first.device if first is not None else torch.device("cpu")
            noise_gen = noise_generator or rng.make_generator(seed, "noise", 0, device=device)
            clipper_gen = rng.make_generator(seed, "clipper", 0)
            dp_optimizer = DPOptimizer(
                optimizer,
                grad_sampler=gs,
                clipper=clipper,
                noise=noise_plugin,
                noise_multiplier=sigma,
                expected_batch_size=requested_rate * num_samples,
                loss_reduction=cfg.loss_reduction,
                noise_generator=noise_gen,
                clipper_generator=clipper_gen,
                module=inner,
                distributed=distributed,
            )
        except Exception:
            gs.detach()
            raise
        if smp.min_separation > 1:
            dp_optimizer.max_batches_per_step = 1
        dp_loader.batch_listeners.append(
            lambda: setattr(dp_optimizer, "logical_batches", dp_optimizer.logical_batches + 1)
        )
        dp_optimizer.attach_step_hook(self._account)
        batch_first = cfg.batch_first

        def before_forward(_module: nn.Module, args: Any, kwargs: Any) -> None:
            # Clip the previous backward pass now, so accumulation never keeps more than
            # one batch of activations; then note whether this pass is an empty batch.
            dp_optimizer.flush()
            if torch.is_grad_enabled():  # a no-grad pass (evaluation) has no backward
                dp_optimizer.empty_forward = _is_empty_batch(args, kwargs, batch_first)

        self._handles.append(inner.register_forward_pre_hook(before_forward, with_kwargs=True))

        # -- remember the run ----------------------------------------------------------------
        self.module, self.optimizer, self.data_loader = inner, dp_optimizer, dp_loader
        self.grad_sampler, self.clipper, self.noise, self.sampler = gs, clipper, noise_plugin, smp
        self.noise_multiplier, self.sample_rate = sigma, float(smp.sample_rate)
        self.num_samples, self.world_size, self.seed = num_samples, world_size, seed
        self.noise_generator, self.clipper_generator = noise_gen, clipper_gen
        self._run_config = cfg
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            # [checkpoint owner] a state loaded before make_private is checked against this
            # run's privacy configuration now that it exists (refused or merged there).
            from .checkpoint import reconcile_state

            self.load_state_dict(reconcile_state(state, self.state_dict()))

        out_module = PrivateModule(module) if wrap_model else module
        if criterion is not None:
            return out_module, dp_optimizer, criterion, dp_loader
        return out_module, dp_optimizer, dp_loader

    @staticmethod
    def _distribution(
        cfg: EngineConfig,
        distributed: bool,
        data_loader: DataLoader,
        num_samples: int,
        sample_rate: float,
    ) -> tuple[int, int, int, str]:
        """``(world_size, rank, seed, sampler name)`` of the run. [distributed owner]

        For a DPDDP model: every rank must have the same configuration, data set size and
        sample rate (checked, a collective); a missing seed is rank 0's fresh one, shared,
        so that ranks draw the same clipper statistics; ``poisson`` becomes
        ``distributed_poisson`` (global rate, one shared stream, exact on resume even with
        another world size).
        """
        if not distributed:
            if _dist.world_size() > 1:
                warnings.warn(
                    f"torch.distributed is initialised with {_dist.world_size()} ranks but the "
                    "model is not a dpcore.DPDDP: each rank trains its own private model on the "
                    "whole data set (and each model spends its own budget). For data-parallel "
                    "training wrap the model first: model = dpcore.DPDDP(model).",
                    UserWarning,
                    stacklevel=4,
                )
            seed = cfg.seed if cfg.seed is not None else rng.fresh_seed()
            return 1, 0, seed, cfg.sampler.name
        _dist.require_initialized("make_private with a DPDDP model")
        if isinstance(getattr(data_loader, "sampler", None), torch.utils.data.DistributedSampler):
            warnings.warn(
                "the data loader has a DistributedSampler; dpcore ignores it and draws each "
                "rank's share of every batch itself. Pass the loader you would use on one "
                f"process (batch_size = the global batch): with this one the sample rate is "
                f"1/len(data_loader) = {sample_rate:.6g}, i.e. an expected global batch of "
                f"{sample_rate * num_samples:.1f}.",
                UserWarning,
                stacklevel=4,
            )
        seed = cfg.seed if cfg.seed is not None else _dist.broadcast_object(rng.fresh_seed())
        checked = cfg.model_dump(exclude={"seed"} if cfg.seed is None else set())
        _dist.check_same_config(
            {**checked, "num_samples": num_samples, "sample_rate": sample_rate},
            what="engine configuration (with data set size and sample rate)",
        )
        name = "distributed_poisson" if cfg.sampler.name == "poisson" else cfg.sampler.name
        return _dist.world_size(), _dist.rank(), seed, name

    @staticmethod
    def _check_optimizer_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        owned = {id(p) for p in module.parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in owned:
                    raise PrivacyEngineError(
                        f"the optimizer holds a parameter the model does not own "
                        f"(param_groups[{gi}]['params'][{pi}], shape {tuple(p.shape)}): build the "
                        "optimizer from model.parameters() of the model you pass to make_private "
                        "(after ModuleValidator.fix, which replaces modules and their parameters)."
                    )

    @staticmethod
    def _check_compatible(cfg: EngineConfig, smp: Any, noise_plugin: Any) -> None:
        need = int(getattr(noise_plugin, "min_separation", 1))
        have = int(getattr(smp, "min_separation", 1))
        if have < need:
            raise IncompatiblePluginsError(
                f"noise {cfg.noise.name!r} needs every example's participations to be at least "
                f"{need} steps apart, but sampler {cfg.sampler.name!r} only guarantees {have}; the "
                "privacy accounting would be wrong. Use sampler 'cyclic_poisson' with a cycle "
                f"length of at least {need}, or fewer bands."
            )
        if not getattr(smp, "dp_exact", True):
            warnings.warn(
                f"sampler {cfg.sampler.name!r} does not produce the Poisson-subsampled batches the "
                "accountant assumes; the reported epsilon is an approximation, not a guarantee. "
                "Use poisson_sampling=True (sampler 'poisson') for a guarantee.",
                UserWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------------------
    # Accounting
    # ------------------------------------------------------------------------------
    def _account(self, optimizer: DPOptimizer) -> None:
        """Step hook: the generic rule of the contracts, one event per ``min_separation``."""
        separation = max(1, int(getattr(self.sampler, "min_separation", 1)))
        if optimizer.last_step_drawn == 0 and not self._warned_no_batch:
            self._warned_no_batch = True
            warnings.warn(
                "the optimizer stepped without a batch from the data loader that make_private "
                "returned. The privacy accounting assumes the batches that loader samples; "
                "iterate it (not the original data loader) so that ε is what was spent.",
                UserWarning,
                stacklevel=4,
            )
        if self.steps % separation == 0:
            k = optimizer.last_step_batches
            # k independently drawn batches summed under ONE noise draw of std σ·C equal the
            # sum of k releases with std σ·C/√k each: k events at σ/√k (post-processing).
            sigma = optimizer.noise_multiplier / math.sqrt(k)
            self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate, steps=k)
        self.steps += 1

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far, at ``delta``."""
        return float(self.accountant.get_epsilon(delta))

    # ------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the model and optimizer (plain data)."""
        if self.optimizer is None:
            raise PrivacyEngineError("the engine has no state before make_private")
        cfg = self._run_config
        loader_state = self.data_loader.state_dict() if self.data_loader is not None else {}
        generators: dict[str, Any] = {}
        if self.noise_generator is not None:
            generators["noise"] = self.noise_generator.get_state()
        if self.clipper_generator is not None:
            generators["clipper"] = self.clipper_generator.get_state()
        return {
            "format": STATE_FORMAT,
            "config": cfg.model_dump() if cfg is not None else None,
            "accountant": self.accountant.state_dict(),
            "clipper": self.clipper.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": loader_state,
            "generators": generators,
            "steps": self.steps,
            "epoch": int(loader_state.get("epoch", 0)),
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "noise_multiplier": self.noise_multiplier,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; before ``make_private`` it is applied when the model
        is made private (the accountant is restored at once)."""
        if int(state.get("format", 0)) != STATE_FORMAT:
            raise PrivacyEngineError(f"unknown engine state format {state.get('format')!r}")
        if self.optimizer is not None:
            self._check_world_size(state)
        self.accountant.load_state_dict(state["accountant"])
        if self.optimizer is None:
            self._pending_state = state
            return
        self.clipper.load_state_dict(state["clipper"])
        self.noise.load_state_dict(state["noise"])
        if state.get("sampler") and self.data_loader is not None:
            self.data_loader.load_state_dict(state["sampler"])
        gens = state.get("generators") or {}
        if "noise" in gens and self.noise_generator is not None:
            self.noise_generator.set_state(gens["noise"])
        if "clipper" in gens and self.clipper_generator is not None:
            self.clipper_generator.set_state(gens["clipper"])
        self.steps = int(state["steps"])
        self.optimizer.steps = self.steps

    def _check_world_size(self, state: Mapping[str, Any]) -> None:
        """[distributed owner] A run may resume on another number of ranks only if its
        sampler's global batches do not depend on it (``distributed_poisson``,
        ``cyclic_poisson``, single-process ``poisson``): then rank 0's sampler state
        re-shards exactly. Otherwise the restored position would mean other batches."""
        saved = int(state.get("world_size", 1) or 1)
        if saved == self.world_size or getattr(self.sampler, "world_size_independent", False):
            return
        from .errors import DistributedError

        raise DistributedError(
            f"the checkpoint was written by a run on {saved} rank(s), this run has "
            f"{self.world_size}, and sampler {type(self.sampler).__name__} cannot re-shard its "
            f"state to another world size. Resume on {saved} rank(s) (torchrun "
            f"--nproc-per-node {saved}), or use the 'poisson' sampler (distributed_poisson "
            "under DPDDP), whose global batches do not depend on the world size."
        )

    def save_checkpoint(
        self,
        *,
        path: str | Path,
        module: nn.Module,
        optimizer: Any,
        data_loader: Any = None,
        **extra: Any,
    ) -> Any:
        """Write a checkpoint of the run (see :mod:`dpcore.checkpoint`)."""
        from . import checkpoint

        return checkpoint.save_checkpoint(
            self, path=path, module=module, optimizer=optimizer, data_loader=data_loader, **extra
        )

    def load_checkpoint(
        self,
        *,
        path: str | Path,
        module: nn.Module,
        optimizer: Any = None,
        data_loader: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        from . import checkpoint

        return checkpoint.load_checkpoint(
            self, path=path, module=module, optimizer=optimizer, data_loader=data_loader, **kwargs
        )

    # ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook from the model; the engine can then make another run private.

        The accountant (privacy spent) is kept.
        """
        for handle in self._handles:
            handle.remove()
        if self.grad_sampler is not None:
            self.grad_sampler.detach()
        accountant = self._accountant
        self._reset_run()
        self._accountant = accountant
