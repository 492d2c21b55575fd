"""The reverse diffusion process as a Markov decision process (thesis section 5.1), for DDPM/DDIM models and
rectified-flow (flow-matching) models such as SD3.

A state is s_t = (x_t, t, c); an action is the next sample x_{t-1}; the policy is one reverse step of the
diffusion model, a diagonal Gaussian N(mu_t, sigma_t^2) whose mean and standard deviation come from the
model output and the noise schedule. This module turns a denoiser into that policy:

    schedule = schedule_for_model(base.scheduler_config, base.is_latent, num_steps=25)  # DDPM/DDIM or flow
    out = policy_step(model, schedule, x_t, step_index, cond, generator=g)   # mean, std, action, logprob
    logprob = action_logprob(model, schedule, x_t, step_index, cond, action) # any model, any action
    buf = rollout(model, schedule, x_T, cond, generator=g)                   # B environments x T steps
    x_0 = ReparameterizedChain(model, schedule)(x_T, cond, noise)           # the chain with gradients (thesis 6.8)

Conventions (all explicit, all tested):
- Steps are indexed i = 0..T-1 in sampling order; `schedule.timesteps[i]` is the training timestep of
  state x_i (descending). Action i turns x_i into x_{i+1}; x_T is the final sample x_0 of the paper.
- Respacing: any subset of the training timesteps; the step betas are recomputed from the kept
  alpha-bars, beta_i = 1 - abar(t_i) / abar(t_{i+1}) (Nichol & Dhariwal 2021, section 4), with
  abar = 1 after the last kept timestep.
- Every step, the last one included, is a stochastic action with a proper log-likelihood. The last
  step's posterior variance is exactly 0; like guided-diffusion's `posterior_log_variance_clipped` we
  use the variance of the step before it instead (a standard deviation of ~1e-2 or less in practice).
- Flow models (`FlowSchedule`, docs/design.md "The rectified-flow MDP"): the state's time is the scheduler's
  sigma (x = (1 - sigma) x_0 + sigma eps, the model input t = 1000 sigma), the model predicts the velocity, and a
  step is the reverse-time SDE whose marginals match the flow's ODE (Liu et al. 2025, Flow-GRPO) with noise level
  --eta; at --eta 0 its mean is the deterministic Euler step of diffusers' FlowMatchEulerDiscreteScheduler.
- Log-probabilities are computed in float32 whatever the autocast dtype, and reduced over the action
  dimensions by `sum` (the thesis, section 5.3) or `mean` (DDPO's choice); see `SamplerConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# the choices of the sampler settings, as types for the scripts' Args (drlhf.cli turns them into --flag choices)
Spacing = Literal["leading", "trailing", "linspace", "guided"]
Sampler = Literal["ddpm", "ddim", "flow"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
Reduction = Literal["sum", "mean"]
SPACINGS, SAMPLERS, VARIANCE_TYPES, REDUCTIONS = (get_args(t) for t in (Spacing, Sampler, VarianceType, Reduction))
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # flow: the velocity of a rectified flow


# ---------------------------------------------------------------------------------------------------------
# Noise schedules (plumbing)
# ---------------------------------------------------------------------------------------------------------
def make_betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """Training betas as float64, for the schedule names diffusers uses in `scheduler_config.json`."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # cosine schedule, Nichol & Dhariwal 2021, Eq. 17, beta <= 0.999
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; expected linear, scaled_linear or "
                     "squaredcos_cap_v2")


def space_timesteps(num_train_timesteps: int, num_steps: int | str, spacing: str = "leading",
                    steps_offset: int = 0) -> list[int]:
    """The kept training timesteps, in sampling (descending) order.

    leading/trailing/linspace: as diffusers' `timestep_spacing` (Lin et al. 2023, Table 2).
    guided: guided-diffusion's `space_timesteps` with section counts such as "25" or "10,15,20"
    (each section's steps evenly strided, rounded with Python's round-half-to-even), or "ddimN".
    """
    n = num_train_timesteps
    if spacing == "guided":
        spec = str(num_steps)
        if spec.startswith("ddim"):
            want = int(spec[4:])
            for stride in range(1, n):
                if len(range(0, n, stride)) == want:
                    return sorted(range(0, n, stride), reverse=True)
            raise ValueError(f"cannot make {want} evenly strided steps out of {n}")
        counts = [int(c) for c in spec.split(",")]
        size_per, extra = divmod(n, len(counts))
        kept, start = set(), 0
        for i, count in enumerate(counts):
            size = size_per + (1 if i < extra else 0)
            if size < count:
                raise ValueError(f"cannot take {count} steps out of a section of {size}")
            stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
            kept.update(start + round(stride * k) for k in range(count))
            start += size
        return sorted(kept, reverse=True)
    t = int(num_steps)
    if not 1 <= t <= n:
        raise ValueError(f"--num-steps must be in 1..{n}, got {t}")
    if spacing == "leading":
        steps = [k * (n // t) + steps_offset for k in range(t)]
    elif spacing == "trailing":
        steps = [round(n - k * n / t) - 1 for k in range(t)][::-1]
    elif spacing == "linspace":
        steps = [round(x) for x in torch.linspace(0, n - 1, t, dtype=torch.float64).tolist()]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return sorted(set(steps), reverse=True)


@dataclass
class SamplerConfig:
    """How a rollout samples; every field is a named, recorded choice."""
    sampler: str = "ddpm"                 # ddpm (thesis), ddim with eta > 0, or flow (rectified-flow models)
    num_steps: int | str = 25             # Table 6.2 "Timesteps"
    spacing: str = "leading"              # which training timesteps are kept
    steps_offset: int = 0                 # diffusers' steps_offset (1 for Stable Diffusion)
    eta: float = 1.0                      # DDIM's eta / the flow SDE's noise level a; 0 = deterministic (no policy)
    variance_type: str = "fixed_small"    # fixed_small, fixed_large or learned_range
    prediction_type: str = "epsilon"      # epsilon, v_prediction or sample
    clip_sample: float | None = 1.0       # clip predicted x0 to [-c, c] (pixel models); None for latents
    guidance_scale: float = 1.0           # classifier-free guidance; 1 = off. Table 6.2 "CFG Scale"
    logprob_reduction: str = "sum"        # sum over action dims (thesis 5.3) or mean (DDPO)

    def __post_init__(self):
        for value, allowed, flag in ((self.sampler, SAMPLERS, "sampler"), (self.spacing, SPACINGS, "spacing"),
                                     (self.variance_type, VARIANCE_TYPES, "variance-type"),
                                     (self.prediction_type, PREDICTION_TYPES, "prediction-type"),
                                     (self.logprob_reduction, REDUCTIONS, "logprob-reduction")):
            if value not in allowed:
                raise ValueError(f"--{flag} must be one of {allowed}, got {value!r}")
        if self.sampler in ("ddim", "flow") and self.eta <= 0:
            raise ValueError(f"--eta must be > 0 for --sampler {self.sampler}: with eta = 0 the step is deterministic "
                             "and has no log-likelihood")


class DiffusionSchedule:
    """Per-step coefficients of a respaced sampler, as float64 tensors of shape (T,)."""

    def __init__(self, train_betas: torch.Tensor, timesteps: list[int], cfg: SamplerConfig):
        self.cfg = cfg
        self._on_device = {}  # (id of a coefficient tensor, device) -> its copy there
        abar_all = torch.cumprod(1 - train_betas.double(), 0)
        self.num_train_timesteps = len(train_betas)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long)  # (T,) descending
        if (self.timesteps[:-1] <= self.timesteps[1:]).any() or self.timesteps.min() < 0 or \
                self.timesteps.max() >= len(train_betas):
            raise ValueError(f"timesteps must be strictly descending within 0..{len(train_betas) - 1}")
        abar = abar_all[self.timesteps]
        abar_prev = torch.cat([abar[1:], abar.new_ones(1)])  # abar of the kept next timestep, 1 after the last
        beta = 1 - abar / abar_prev                            # respaced betas from the kept alpha-bars
        post_var = beta * (1 - abar_prev) / (1 - abar)         # beta-tilde, DDPM Eq. 7
        if len(beta) > 1:  # the last step has beta-tilde = 0: use the step before (guided-diffusion's clipping)
            post_var_clipped = torch.cat([post_var[:-1], post_var[-2:-1]])
        else:
            post_var_clipped = beta.clone()
        self.abar, self.abar_prev, self.beta = abar, abar_prev, beta
        self.log_var_min = post_var_clipped.log()              # fixed_small / lower end of learned_range
        large = torch.cat([beta[:-1], post_var_clipped[-1:]]) if len(beta) > 1 else beta
        self.log_var_max = beta.log()                          # upper end of learned_range (guided-diffusion)
        self.log_var_large = large.log()                       # fixed_large (guided-diffusion's variant)
        self.mean_coef_x0 = abar_prev.sqrt() * beta / (1 - abar)                  # DDPM Eq. 7
        self.mean_coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        ddim_var = cfg.eta ** 2 * (1 - abar_prev) / (1 - abar) * beta             # DDIM Eq. 16
        if len(beta) > 1:
            ddim_var = torch.cat([ddim_var[:-1], ddim_var[-2:-1]])
        self.ddim_var = ddim_var

    @classmethod
    def from_config(cls, scheduler_config: dict, cfg: SamplerConfig) -> "DiffusionSchedule":
        """Build from a diffusers `scheduler_config.json` dict (beta schedule and training length)."""
        if scheduler_config.get("trained_betas") is not None:
            betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
        else:
            betas = make_betas(scheduler_config.get("beta_schedule", "linear"),
                               scheduler_config.get("num_train_timesteps", 1000),
                               scheduler_config.get("beta_start", 1e-4), scheduler_config.get("beta_end", 0.02))
        steps = space_timesteps(len(betas), cfg.num_steps, cfg.spacing, cfg.steps_offset)
        return cls(betas, steps, cfg)

    @classmethod
    def for_model(cls, scheduler_config: dict, is_latent: bool, sampler: str = "ddpm", num_steps=25,
                  spacing: str = "leading", eta: float = 1.0, variance_type: str | None = None,
                  guidance_scale: float = 1.0, logprob_reduction: str = "sum") -> "DiffusionSchedule":
        """The rollout schedule of a base model: its training betas, prediction type, variance type (unless
        overridden) and x0 clipping (pixel models only), with the run's sampler flags."""
        clip = scheduler_config.get("clip_sample", not is_latent) and not is_latent
        schedule = cls.from_config(scheduler_config, SamplerConfig(
            sampler=sampler, num_steps=num_steps, spacing=spacing, eta=eta, guidance_scale=guidance_scale,
            logprob_reduction=logprob_reduction,
            steps_offset=scheduler_config.get("steps_offset", 0) if spacing == "leading" else 0,
            variance_type=variance_type or scheduler_config.get("variance_type", "fixed_small"),
            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            clip_sample=scheduler_config.get("clip_sample_range", 1.0) if clip else None))
        if isinstance(num_steps, int) and schedule.num_steps != num_steps:  # rounding can merge respaced steps
            raise ValueError(f"--num-steps {num_steps} with --spacing {spacing} keeps {schedule.num_steps} distinct steps")
        return schedule

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def on(self, coef: torch.Tensor, device) -> torch.Tensor:
        """A coefficient tensor of this schedule on `device`, copied there once (a host-to-GPU copy at every step
        would make the CPU wait for the GPU's queue each time)."""
        key = (id(coef), str(device))
        if key not in self._on_device:
            self._on_device[key] = coef.to(device)
        return self._on_device[key]

    def _at(self, coef: torch.Tensor, idx: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather per-state coefficients (B,) and shape them to broadcast over (B, C, H, W), in float32."""
        return self.on(coef, idx.device)[idx].float().view(-1, *([1] * (ndim - 1)))

    # -----------------------------------------------------------------------------------------------------
    # METHOD: model output -> Gaussian policy N(mean, std^2)
    # -----------------------------------------------------------------------------------------------------
    def distribution(self, model_output: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor):
        """Mean and std of p(x_{i+1} | x_i) for states at step indices idx (B,), computed in float32."""
        cfg = self.cfg
        model_output, x_t = model_output.float(), x_t.float()
        c = x_t.shape[1]
        if cfg.variance_type == "learned_range":
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"variance_type=learned_range needs {2 * c} output channels, the model gives "
                                 f"{model_output.shape[1]}")
            model_output, var_values = model_output[:, :c], model_output[:, c:]
        elif model_output.shape[1] != c:
            raise ValueError(f"the model gives {model_output.shape[1]} output channels for {c} input channels; "
                             "use --variance-type learned_range for models that predict their variance")
        a = self._at(self.abar, idx, x_t.ndim)
        if cfg.prediction_type == "epsilon":
            x0 = (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
        elif cfg.prediction_type == "v_prediction":  # Salimans & Ho 2022, section 4
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
        else:
            x0 = model_output
        if cfg.clip_sample is not None:
            x0 = x0.clamp(-cfg.clip_sample, cfg.clip_sample)
        if cfg.sampler == "ddpm":
            mean = self._at(self.mean_coef_x0, idx, x_t.ndim) * x0 + self._at(self.mean_coef_xt, idx, x_t.ndim) * x_t
            if cfg.variance_type == "fixed_small":
                log_var = self._at(self.log_var_min, idx, x_t.ndim).expand_as(x_t)
            elif cfg.variance_type == "fixed_large":
                log_var = self._at(self.log_var_large, idx, x_t.ndim).expand_as(x_t)
            else:  # learned_range: interpolate log(beta-tilde) .. log(beta), Nichol & Dhariwal 2021 Eq. 15
                frac = (var_values + 1) / 2
                log_var = frac * self._at(self.log_var_max, idx, x_t.ndim) + \
                    (1 - frac) * self._at(self.log_var_min, idx, x_t.ndim)
            return mean, (0.5 * log_var).exp()
        # DDIM with eta > 0 (Song et al. 2021, Eq. 12); eps re-derived from the (possibly clipped) x0
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        ap = self._at(self.abar_prev, idx, x_t.ndim)
        var = self._at(self.ddim_var, idx, x_t.ndim)
        mean = ap.sqrt() * x0 + (1 - ap - var).clamp(min=0).sqrt() * eps
        return mean, var.sqrt().expand_as(x_t)


# ---------------------------------------------------------------------------------------------------------
# Rectified-flow models (SD3): the flow's sigmas, and the stochastic step as a Gaussian policy
# ---------------------------------------------------------------------------------------------------------
def is_flow_model(scheduler_config: dict) -> bool:
    """Whether a diffusers scheduler config belongs to a flow-matching model (FlowMatchEulerDiscreteScheduler)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def flow_sigmas(num_steps: int, num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The sampling sigmas (T+1,) float64 of FlowMatchEulerDiscreteScheduler.set_timesteps with a static shift:
    T values evenly spaced from 1 down to the smallest training sigma, each shifted s -> shift s / (1 + (shift - 1) s)
    (SD3's timestep shift, Esser et al. 2024, Eq. 23: more steps at high noise), then 0. As the scheduler does, the
    lower end is the already shifted smallest training sigma, shifted once more."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    lowest = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32).double())
    sigmas = shifted(torch.linspace(1.0, float(lowest), num_steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def calculate_shift(image_tokens: int, scheduler_config: dict) -> float:
    """mu of the resolution-dependent timestep shift (FLUX.1, Qwen-Image): linear in the image's token count, from
    base_shift at base_image_seq_len tokens to max_shift at max_image_seq_len (the defaults are FLUX.1's published
    256 -> 0.5 and 4096 -> 1.15; the pipelines pass this mu to FlowMatchEulerDiscreteScheduler.set_timesteps)."""
    c = scheduler_config
    lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    return base + (top - base) * (image_tokens - lo) / (hi - lo)


def scheduler_sigmas(scheduler_config: dict, num_steps: int, sigmas: list[float] | None = None,
                     mu: float | None = None) -> torch.Tensor:
    """The sampling sigmas (T+1,) float64 that FlowMatchEulerDiscreteScheduler.set_timesteps makes of its config:
    `sigmas` as given (None: `flow_sigmas`' even spacing), shifted statically (shift s / (1 + (shift - 1) s)) or,
    with use_dynamic_shifting, by mu: e^mu / (e^mu + 1/s - 1) ("exponential") or mu / (mu + 1/s - 1) ("linear");
    with shift_terminal, stretched so that the last sigma is that value (1 - s scaled); then 0 appended."""
    c = scheduler_config
    n_train, dynamic = c.get("num_train_timesteps", 1000), c.get("use_dynamic_shifting", False)
    if sigmas is None and not dynamic and not c.get("shift_terminal"):
        return flow_sigmas(num_steps, n_train, c.get("shift", 1.0))  # SD3: the static case, as before
    if dynamic and mu is None:
        raise ValueError("the model's flow scheduler shifts its timesteps by the image's size "
                         "(use_dynamic_shifting); its family must give mu")
    if sigmas is None:
        lowest = 1.0 / n_train if dynamic else None
        s = torch.linspace(1.0, lowest, num_steps, dtype=torch.float64) if dynamic else \
            flow_sigmas(num_steps, n_train, c.get("shift", 1.0))[:-1]
    else:
        s = torch.tensor(sigmas, dtype=torch.float32).double()  # the scheduler reads them as float32
        if len(s) != num_steps:
            raise ValueError(f"{len(s)} sigmas for {num_steps} steps")
    if dynamic:
        if c.get("time_shift_type", "exponential") == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            s = mu / (mu + (1 / s - 1))
    elif sigmas is not None:
        shift = c.get("shift", 1.0)
        s = shift * s / (1 + (shift - 1) * s)
    if c.get("shift_terminal"):
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - c["shift_terminal"]))
    return torch.cat([s, s.new_zeros(1)])


class FlowSchedule(DiffusionSchedule):
    """The rectified-flow MDP, with the interface of DiffusionSchedule (timesteps, cfg, distribution).

    The model predicts the velocity v = eps - x_0 at x = (1 - sigma) x_0 + sigma eps. Step i goes from sigma to
    sigma' = sigma_{i+1} < sigma, dt = sigma' - sigma < 0, by the reverse-time SDE whose marginals are the ODE's
    (derivation in docs/design.md; Liu et al. 2025, arXiv 2505.05470, Flow-GRPO):
        g^2  = a^2 sigma / (1 - sigma)                      the noise injected, a = --eta (the noise level)
        mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
        std  = g sqrt(-dt)
    At sigma = 1 (pure noise) g^2 is infinite; the first step takes 1 - sigma' in its denominator instead (as
    Flow-GRPO). With a = 0 the mean is the Euler step x + v dt and the std is 0 (not a policy: SamplerConfig
    refuses --eta 0; `noise_level=0` exists for the test against diffusers' scheduler)."""

    def __init__(self, sigmas: torch.Tensor, cfg: SamplerConfig, num_train_timesteps: int = 1000,
                 noise_level: float | None = None):
        self.cfg, self._on_device = cfg, {}
        self.num_train_timesteps = num_train_timesteps
        sigmas = sigmas.double()
        if (sigmas[:-1] <= sigmas[1:]).any() or sigmas[0] > 1 or sigmas[-1] != 0:
            raise ValueError("flow sigmas must descend strictly from at most 1 to a final 0")
        sigma, dt = sigmas[:-1], sigmas[1:] - sigmas[:-1]
        self.sigmas = sigmas                                             # (T+1,) the last is 0: the clean sample
        self.timesteps = (sigma * num_train_timesteps).float()            # (T,) the model's time input
        a = cfg.eta if noise_level is None else noise_level
        g2 = a ** 2 * sigma / torch.where(sigma == 1, 1 - sigmas[1:], 1 - sigma)
        self.coef_x = 1 + g2 * dt / (2 * sigma)
        self.coef_v = (1 + g2 * (1 - sigma) / (2 * sigma)) * dt
        self.flow_std = (g2 * -dt).sqrt()

    @classmethod
    def for_model(cls, scheduler_config: dict, num_steps: int = 10, eta: float = 0.7, guidance_scale: float = 1.0,
                  logprob_reduction: str = "sum", sigmas: list[float] | None = None,
                  mu: float | None = None) -> "FlowSchedule":
        """The rollout schedule of a flow model: its scheduler config's training length and timestep shift (static,
        or resolution-dependent through `mu`), with the sigmas its pipeline asks for (None: the scheduler's own);
        the model's family gives sigmas and mu (drlhf.families: Family.flow_timesteps)."""
        unsupported = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                       if scheduler_config.get(k)]
        if unsupported:
            raise ValueError(f"the model's flow scheduler sets {', '.join(unsupported)}, which the flow sampler does "
                             "not reproduce")
        if not isinstance(num_steps, int) and not str(num_steps).isdigit():
            raise ValueError(f"--num-steps {num_steps}: a flow model takes a plain number of steps")
        n_train = scheduler_config.get("num_train_timesteps", 1000)
        cfg = SamplerConfig(sampler="flow", num_steps=int(num_steps), spacing="linspace", eta=eta,
                            prediction_type="flow", clip_sample=None, guidance_scale=guidance_scale,
                            logprob_reduction=logprob_reduction)
        return cls(scheduler_sigmas(scheduler_config, int(num_steps), sigmas, mu), cfg, n_train)

    def distribution(self, model_output: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor):
        """Mean and std of p(x_{i+1} | x_i) from the velocity, in float32."""
        v, x_t = model_output.float(), x_t.float()
        if v.shape[1] != x_t.shape[1]:
            raise ValueError(f"the flow model gives {v.shape[1]} output channels for {x_t.shape[1]} input channels")
        mean = self._at(self.coef_x, idx, x_t.ndim) * x_t + self._at(self.coef_v, idx, x_t.ndim) * v
        return mean, self._at(self.flow_std, idx, x_t.ndim).expand_as(x_t)


def schedule_for_model(scheduler_config: dict, is_latent: bool, sampler: str | None = None, num_steps=25,
                       spacing: str = "leading", eta: float = 1.0, variance_type: str | None = None,
                       guidance_scale: float = 1.0, logprob_reduction: str = "sum",
                       flow_timesteps: dict | None = None) -> DiffusionSchedule:
    """The MDP of a base model: a FlowSchedule for flow-matching models (--sampler flow), else a DiffusionSchedule.
    sampler None: the model's own (flow for a flow-matching model, else ddpm); a sampler the model cannot take is
    refused. The schedule's cfg.sampler says which one was used. flow_timesteps: the sigmas and mu the model's
    pipeline gives its scheduler (BaseModel.flow_timesteps; {} for SD3)."""
    flow = is_flow_model(scheduler_config)
    sampler = sampler or ("flow" if flow else "ddpm")
    if flow != (sampler == "flow"):
        raise ValueError(f"--sampler {sampler}: the base model is a {'rectified-flow' if flow else 'DDPM-trained'} "
                         f"model; use --sampler {'flow' if flow else 'ddpm or ddim'}")
    if flow:
        return FlowSchedule.for_model(scheduler_config, num_steps, eta, guidance_scale, logprob_reduction,
                                      **(flow_timesteps or {}))
    return DiffusionSchedule.for_model(scheduler_config, is_latent, sampler, num_steps, spacing, eta, variance_type,
                                       guidance_scale, logprob_reduction)


# ---------------------------------------------------------------------------------------------------------
# METHOD: the policy
# ---------------------------------------------------------------------------------------------------------
def gaussian_logprob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     reduction: str = "sum") -> torch.Tensor:
    """log N(action; mean, std^2) per state (B,), in float32, reduced over all action dimensions."""
    action, mean, std = action.float(), mean.float(), std.float()
    lp = -0.5 * ((action - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.sum(1) if reduction == "sum" else lp.mean(1)


@dataclass
class StepOutput:
    mean: torch.Tensor      # (B, C, H, W) float32
    std: torch.Tensor       # (B, C, H, W) float32
    action: torch.Tensor    # (B, C, H, W) float32, x_{i+1}
    logprob: torch.Tensor   # (B,) float32


def model_distribution(model, schedule: DiffusionSchedule, x_t, idx, cond):
    """One model forward (cond + uncond batched by the model when guidance is on) -> mean, std."""
    t = schedule.on(schedule.timesteps, x_t.device)[idx]
    return schedule.distribution(model(x_t, t, cond), x_t, idx)


def policy_step(model, schedule: DiffusionSchedule, x_t, idx, cond, generator=None) -> StepOutput:
    """Sample an action a ~ pi(.|x_t, t, c) and return it with its log-likelihood."""
    mean, std = model_distribution(model, schedule, x_t, idx, cond)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    action = mean + std * noise
    return StepOutput(mean, std, action, gaussian_logprob(action, mean, std, schedule.cfg.logprob_reduction))


def action_logprob(model, schedule: DiffusionSchedule, x_t, idx, cond, action) -> torch.Tensor:
    """log pi(action | x_t, t, c) under any model (the policy being trained, the frozen base...)."""
    mean, std = model_distribution(model, schedule, x_t, idx, cond)
    return gaussian_logprob(action, mean, std, schedule.cfg.logprob_reduction)


# ---------------------------------------------------------------------------------------------------------
# METHOD: rollout of B environments for T steps, batched
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    latents: torch.Tensor     # (T+1, B, C, H, W) x_0..x_T in sampling order; latents[i+1] is action i
    logprobs: torch.Tensor    # (T, B) log pi(action_i | state_i) at sampling time
    timesteps: torch.Tensor   # (T,) training timestep of each state
    step_index: torch.Tensor  # (T,) 0..T-1
    cond: object              # (B, ...) conditioning of each environment (None for unconditional models)

    @property
    def samples(self) -> torch.Tensor:  # (B, C, H, W) the finished samples (latents for latent models)
        return self.latents[-1]


@torch.no_grad()
def rollout(model, schedule: DiffusionSchedule, x_T: torch.Tensor, cond=None, generator=None,
            progress=None, step=policy_step) -> Rollout:
    """Run every environment through the whole reverse process in one batch per step. `step` is `policy_step` or
    any function of the same signature and result (drlhf/plan.py evaluates the model in the update's passes)."""
    T, B = schedule.num_steps, x_T.shape[0]
    latents = [x_T.float()]
    logprobs = []
    steps = range(T) if progress is None else progress(range(T))
    for i in steps:
        idx = torch.full((B,), i, dtype=torch.long, device=x_T.device)
        out = step(model, schedule, latents[-1], idx, cond, generator)
        latents.append(out.action)
        logprobs.append(out.logprob)
    return Rollout(torch.stack(latents), torch.stack(logprobs), schedule.timesteps.clone(),
                   torch.arange(T), cond)


# ---------------------------------------------------------------------------------------------------------
# METHOD: the sampling chain as one differentiable function (thesis 6.8, "Macaw: Without RL")
# ---------------------------------------------------------------------------------------------------------
class ReparameterizedChain(nn.Module):
    """x_T, fixed noise z (T, B, C, H, W) -> x_0 through all T policy steps with gradients:
    x_{i+1} = mean_theta(x_i) + std_theta(x_i) * z_i, the same transition as `policy_step` with its noise drawn
    up front, so that d reward(x_0) / d theta flows back through every step.

    One forward runs the whole chain, so a DistributedDataParallel wrapper around this module sees one forward
    per backward. With `checkpoint_steps` only x_i of each step is kept and each U-Net forward is recomputed in
    the backward pass: activation memory ~ one step instead of T steps, for one extra forward per step.
    """

    def __init__(self, model: nn.Module, schedule: DiffusionSchedule, checkpoint_steps: bool = True):
        super().__init__()
        self.model, self.schedule, self.checkpoint_steps = model, schedule, checkpoint_steps

    def _step(self, x, idx, cond, z):
        mean, std = model_distribution(self.model, self.schedule, x, idx, cond)
        return mean + std * z

    def forward(self, x_T: torch.Tensor, cond, noise: torch.Tensor) -> torch.Tensor:
        x = x_T.float()
        for i in range(self.schedule.num_steps):
            idx = torch.full((len(x),), i, dtype=torch.long, device=x.device)
            if self.checkpoint_steps and torch.is_grad_enabled():
                x = checkpoint(self._step, x, idx, cond, noise[i], use_reentrant=False)
            else:
                x = self._step(x, idx, cond, noise[i])
        return x
