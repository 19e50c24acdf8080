"""Diffusion: noise schedules, forward processes, targets, losses, samplers, guidance.

Paper App. C / Tab. A4. Two schedules with one interface (sample_t, q_sample, target, weight,
timesteps); models never see them: they get (x_t, t, cond) and return the schedule's target.
- `Schedule`: discrete DDPM with T = 1000 "quadratic" betas, written in the EDM view
  x_t = (x0 + sigma_t * eps) / sqrt(1 + sigma_t^2). Objectives eps (the paper's), v and x0; DDIM/DDPM samplers.
- `RectifiedFlow`: SD3's paradigm (Tab. A4 middle column, Esser et al. 2024): x_t = (1 - t) x0 + t eps,
  t = 1 pure noise, target v = eps - x0, logit-normal t, Euler sampler on diffusers' sigma grid with SD3's shift.
  The model sees t * T (as diffusers/SD3 do), so timestep and gamma_c embedders work unchanged.

    from diffusion import make_schedule, loss_fn, ddim_sample
    sched = make_schedule(scale=2.0)            # Eq. 3: 256 -> 512 px keeps per-token SNR
    sched = make_schedule(objective="rf")       # SD3's rectified flow
    loss, per_sample, t = loss_fn(model, sched, x0, cond)

All schedule math is float64 -> float32 and device neutral (`sched.to(device)`).
"""
import torch

# Constants of the paper's schedule (App. C, Tab. A4: beta_min 0.00085, beta_max 0.012).
T = 1000
BETA_START = 0.00085
BETA_END = 0.012
OBJECTIVES = ("eps", "v", "x0", "rf")  # model output: eps / v (Salimans & Ho 2022) / x0 / rectified-flow velocity
T_DENSITIES = ("uniform", "logit-normal")  # pi(t) of training; logit-normal = SD3's pi(t; m, s) (Esser et al. §3.1)
LOSS_WEIGHTS = ("none", "min-snr")  # min-snr: Hang et al. 2023, w = min(SNR, gamma) in x0 space
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023's gamma
# Schedule settings a run stores (its spec's "schedule" entry); these defaults are the paper's eps-DDPM.
# t_density None = the objective's own (default_t_density).
SCHEDULE_DEFAULTS = dict(objective="eps", scale=1.0, shift=1.0, t_density=None, t_mean=0.0, t_std=1.0,
                         loss_weight="none", min_snr_gamma=MIN_SNR_GAMMA, zero_snr=False, clip_x0=False)


def default_t_density(objective):
    """Tab. A4: SD3 (rf) draws t logit-normal, the DDPM recipes uniformly."""
    return "logit-normal" if objective == "rf" else "uniform"


def _bcast(v, x):
    """(B,) -> (B, 1, 1, 1) against x."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def _logit_normal(B, m, s, generator, device):
    """u = sigmoid(m + s n), n ~ N(0, 1): SD3's pi(t; m, s) on (0, 1)."""
    return torch.sigmoid(m + s * torch.randn(B, generator=generator, device=device))


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so abar_T = 0, abar_0 kept (fp32, as diffusers)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))  # this operation order: diffusers' float32 result
    abar = abar_sqrt ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


class Schedule:
    """Quadratic beta schedule (sqrt(beta) linear from BETA_START to BETA_END, App. C), optionally rescaled for
    resolution (Eq. 3, Prop. 1), with the objective,
    timestep density and loss weight of a run.

    scale = s'/s. Eq. 3 (abar' = s^2 abar / (s'^2 + abar (s^2 - s'^2))) is the same as multiplying the EDM
    noise level by the scale: sigma' = (s'/s) sigma, abar' = 1/(1+sigma'^2). The same object (same settings)
    must be used for training and sampling. zero_snr: Lin et al. 2024's rescale to abar_{T-1} = 0 (then the
    eps objective cannot give x0 at t = T-1, so it needs v or x0). clip_x0: clamp predicted x0 to [-1, 1]
    while sampling (pixel space).
    """

    def __init__(self, scale=1.0, objective="eps", t_density="uniform", t_mean=0.0, t_std=1.0, loss_weight="none",
                 min_snr_gamma=MIN_SNR_GAMMA, zero_snr=False, clip_x0=False, device="cpu"):
        if objective not in ("eps", "v", "x0"):
            raise ValueError(f"Schedule objective {objective!r}: eps, v or x0 (rf is RectifiedFlow)")
        if zero_snr and objective == "eps":
            raise ValueError("zero_snr with the eps objective: x0 = (x_t - eps) / sqrt(abar) is undefined at "
                             "abar_{T-1} = 0; use objective v or x0 (Lin et al. 2024 §3.2)")
        self.scale, self.objective, self.zero_snr, self.clip_x0 = float(scale), objective, zero_snr, clip_x0
        self.t_density, self.t_mean, self.t_std = t_density, t_mean, t_std
        self.loss_weight, self.min_snr_gamma = loss_weight, min_snr_gamma
        # "scaled_linear" in diffusers: linear in sqrt(beta), then squared (quadratic). Computed
        # in fp32 exactly as diffusers does, so checkpoints trained there see the same abar
        # (an fp64 cumprod differs by up to 5e-7); rescaling is then done in fp64.
        betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float32) ** 2
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0).double()
        sigma = ((1.0 - abar) / abar).sqrt() * self.scale  # EDM noise level, rescaled (inf at t = T-1 if zero_snr)
        self.betas = betas.to(device)  # of the unscaled schedule, for reference
        self.sigma = sigma.float().to(device)
        self.abar = (1.0 / (1.0 + sigma ** 2)).float().to(device)

    def to(self, device):
        self.betas, self.sigma, self.abar = (v.to(device) for v in (self.betas, self.sigma, self.abar))
        return self

    def sample_t(self, B, generator=None, device=None):
        """Training timesteps (B,) in 0..T-1: t ~ U{0..T-1}, or logit-normal over t/T (binned to the grid)."""
        if self.t_density == "uniform":
            return torch.randint(0, T, (B,), generator=generator, device=device)
        u = _logit_normal(B, self.t_mean, self.t_std, generator, device)
        return (u * T).long().clamp(max=T - 1)  # as diffusers' SD3 training picks indices: (u * T).long()

    def q_sample(self, x0, t, eps):
        """x_t = (x0 + sigma_t eps) / sqrt(1 + sigma_t^2)  (= sqrt(abar) x0 + sqrt(1-abar) eps)."""
        sigma = _bcast(self.sigma[t], x0)  # (B, 1, 1, 1)
        xt = (x0 + sigma * eps) / (1.0 + sigma ** 2).sqrt()
        if self.zero_snr:  # sigma = inf at t = T-1: the limit of the EDM form is pure noise
            xt = torch.where(torch.isinf(sigma), eps, xt)
        return xt

    def target(self, x0, eps, t):
        """What the model is trained to output: eps, x0 or v = sqrt(abar) eps - sqrt(1-abar) x0."""
        if self.objective == "eps":
            return eps
        if self.objective == "x0":
            return x0
        a = _bcast(self.abar[t], x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def weight(self, t):
        """Per-sample loss weight (B,) or None. Min-SNR-gamma is min(SNR, gamma) on the x0-space error; the
        objective's MSE relates to it by ||eps err||^2 = SNR ||x0 err||^2, ||v err||^2 = (SNR+1) ||x0 err||^2."""
        if self.loss_weight == "none":
            return None
        snr = (self.abar[t] / (1 - self.abar[t])).double()
        w = snr.clamp(max=self.min_snr_gamma)
        if self.objective == "eps":  # min(SNR, g)/SNR; -> 1 as SNR -> 0 (zero-SNR terminal step)
            w = torch.where(snr > 0, w / snr, torch.ones_like(w))
        elif self.objective == "v":
            w = w / (snr + 1)
        return w.float()

    def timesteps(self, steps, t_start=T - 1):
        """The sampler's model-time grid (see sampling_timesteps)."""
        return sampling_timesteps(steps, t_start)

    def x0_eps(self, out, x, t):
        """Model output at integer step t -> (x0, eps) predictions; clip_x0 clamps x0 and re-derives eps (GLIDE)."""
        a = self.abar[t]
        if self.objective == "eps":
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        elif self.objective == "x0":
            x0 = out
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        else:  # v
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = a.sqrt() * out + (1 - a).sqrt() * x
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps


class RectifiedFlow:
    """SD3's rectified flow (Tab. A4, Esser et al. 2024; diffusers' FlowMatchEulerDiscreteScheduler convention):
    x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 pure noise; the model outputs v = eps - x0 at model time t * T.

    shift: SD3's t' = shift t / (1 + (shift - 1) t), applied to training t and to the sampling grid. It multiplies
    the EDM noise level t / (1 - t) by shift, which is exactly Eq. 3's sigma' = (s'/s) sigma: `scale` (what
    transfer.py sets) and `shift` compose, the effective shift being their product.
    """

    objective = "rf"

    def __init__(self, scale=1.0, shift=1.0, t_density="logit-normal", t_mean=0.0, t_std=1.0, loss_weight="none",
                 min_snr_gamma=MIN_SNR_GAMMA, clip_x0=False, device="cpu"):
        self.scale, self.shift = float(scale), float(shift) * float(scale)
        self.t_density, self.t_mean, self.t_std = t_density, t_mean, t_std
        self.loss_weight, self.min_snr_gamma, self.clip_x0 = loss_weight, min_snr_gamma, clip_x0

    def to(self, device):
        return self  # no tables

    def shift_t(self, t):
        """SD3's resolution shift t' = shift t / (1 + (shift - 1) t)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sample_t(self, B, generator=None, device=None):
        """Training model times (B,) = T t', t ~ pi(t; m, s) (logit-normal) or U(0, 1), t' shifted. Continuous in t
        (Esser et al., minRF); diffusers' SD3 script instead rounds t to its 1000-step grid."""
        if self.t_density == "uniform":
            u = torch.rand(B, generator=generator, device=device)
        else:
            u = _logit_normal(B, self.t_mean, self.t_std, generator, device)
        return self.shift_t(u) * T

    def q_sample(self, x0, t, eps):
        """x_t = (1 - s) x0 + s eps with s = t / T."""
        s = _bcast(t.float() / T, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0, eps, t):
        return eps - x0  # v = d x_t / d s

    def weight(self, t):
        """Unit weight (Tab. A4), or Min-SNR-gamma: SNR = ((1-s)/s)^2 and ||v err||^2 = ||x0 err||^2 / s^2."""
        if self.loss_weight == "none":
            return None
        s = (t.double() / T).clamp(min=1e-12)
        snr = ((1 - s) / s) ** 2
        return (snr.clamp(max=self.min_snr_gamma) * s ** 2).float()

    def sigmas(self, steps, t_start=T - 1):
        """diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).sigmas: linspace(1, sigma_min,
        steps) shifted, then a final 0. Its sigma_min is the shifted 1/T of the training grid, so it is shifted
        twice (diffusers' own convention, kept). t_start < T-1 keeps the sigmas <= (t_start + 1)/T (SDEdit)."""
        s_min = self.shift_t(1.0 / T)
        sig = self.shift_t(torch.linspace(1.0, s_min, steps, dtype=torch.float64)).float()
        sig = sig[sig <= (t_start + 1) / T + 1e-6]
        if len(sig) == 0:
            raise ValueError(f"t_start={t_start} is below the last step of the {steps}-step grid")
        return torch.cat([sig, torch.zeros(1)])

    def timesteps(self, steps, t_start=T - 1):
        """The sampler's model-time grid, sigma * T (float)."""
        return self.sigmas(steps, t_start)[:-1] * T


def make_schedule(objective="eps", scale=1.0, shift=1.0, t_density=None, t_mean=0.0, t_std=1.0,
                  loss_weight="none", min_snr_gamma=MIN_SNR_GAMMA, zero_snr=False, clip_x0=False, device="cpu"):
    """The schedule of a run spec's "schedule" entry (keys of SCHEDULE_DEFAULTS)."""
    common = dict(scale=scale, t_density=t_density or default_t_density(objective), t_mean=t_mean, t_std=t_std,
                  loss_weight=loss_weight, min_snr_gamma=min_snr_gamma, clip_x0=clip_x0, device=device)
    if objective == "rf":
        if zero_snr:
            raise ValueError("zero_snr is for the DDPM schedule; rectified flow reaches pure noise at t = 1 already")
        return RectifiedFlow(shift=shift, **common)
    if shift != 1.0:
        raise ValueError("shift is rectified flow's; for the DDPM schedule use scale (Eq. 3, the same operation)")
    return Schedule(objective=objective, zero_snr=zero_snr, **common)


def schedule_spec(a):
    """The "schedule" entry of a run from train.py's args dict (or an existing entry): keys of SCHEDULE_DEFAULTS;
    keys that older checkpoints lack take the defaults, so they rebuild as they trained."""
    spec = {k: a.get(k, v) for k, v in SCHEDULE_DEFAULTS.items()}
    spec["scale"] = a.get("scale", a.get("schedule_scale", 1.0))
    spec["t_density"] = spec["t_density"] or default_t_density(spec["objective"])
    return spec


def schedule_from_args(a, device="cpu", **override):
    """make_schedule(schedule_spec(a) updated with the non-None overrides), e.g. scale=... from sample.py."""
    spec = schedule_spec(a)
    spec.update({k: v for k, v in override.items() if v is not None})
    return make_schedule(**spec, device=device)


def loss_fn(model, sched, x0, cond, t=None, eps=None):
    """MSE between the model output and the schedule's target, times its loss weight (if any).

    Default (eps, no weight) is plain eps-MSE (SDXL / paper Tab. A4). Tab. A4 lists its loss weight as
    sigma_t^-2: ||eps_hat - eps||^2 equals sigma_t^-2 ||x0_hat - x0||^2 in x0 space (EDM view), so the plain
    eps-MSE *is* that weighting; no extra factor is applied. rf: unit weight on v (Tab. A4, SD3). A model that
    returns several predictions in training (mDT-v2: the full and the masked pass, MDTv2) is trained on the sum
    of their losses.
    t: model times (B,) (integers for Schedule, floats in [0, T] for RectifiedFlow), default sched.sample_t.
    Returns (mean loss, per-sample loss (B,), t (B,)).
    """
    B = x0.shape[0]
    if t is None:
        t = sched.sample_t(B, device=x0.device)
    if eps is None:
        eps = torch.randn_like(x0)
    xt = sched.q_sample(x0, t, eps)
    pred = model(xt, t, cond)
    preds = pred if isinstance(pred, tuple) else (pred,)  # mDT-v2 in training: (unmasked, masked), losses summed
    target = sched.target(x0, eps, t).float()
    per_sample = sum((p.float() - target).pow(2).flatten(1).mean(1) for p in preds)  # (B,), fp32 reduction
    w = sched.weight(t)
    if w is not None:
        per_sample = per_sample * w
    return per_sample.mean(), per_sample, t


def sampling_timesteps(steps, t_start=T - 1):
    """N evenly spaced timesteps starting at T-1: diffusers' "trailing" spacing.

    round(T - i T/N) - 1 for i = 0..N-1, e.g. N=10 -> [999, 899, ..., 99]. The step after the last
    one lands on clean data (abar = 1), i.e. DDIMScheduler(set_alpha_to_one=True). The grid is formed as
    numpy.arange(T, 0, -T/N) forms it (start + i * delta, delta = (T - T/N) - T), so every rounding tie falls
    as in diffusers, but only its first N values are kept: arange's float end test adds an (N+1)-th value
    -1 for 62 N in 1..1000 (61, 103, 121, ...), in diffusers too.
    t_start < T-1 keeps the steps <= t_start (SDEdit-style partial denoising from data noised
    to the first kept step), e.g. N=10, t_start=500 -> [499, 399, ..., 99].
    """
    delta = (T - T / steps) - T
    grid = (T + torch.arange(steps, dtype=torch.float64) * delta).round().long() - 1
    ts = grid[grid <= t_start]
    if len(ts) == 0:
        raise ValueError(f"t_start={t_start} is below the last step ({grid[-1].item()}) of the {steps}-step grid")
    return ts


def _randn(x, generator):
    """Noise like x; a list of generators gives each sample its own stream (EDM2 style),
    so a sample's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device)


def _progress(it, progress):
    if progress:
        from tqdm import tqdm
        return tqdm(it, desc="sampling", leave=False)
    return it


@torch.no_grad()
def sample(fn, x, sched, steps=50, eta=0.0, generator=None, progress=False, callback=None, t_start=T - 1):
    """Generalised DDIM (Song et al. 2021): eta=0 is DDIM, eta=1 is DDPM ancestral; rectified flow: Euler.

    fn(x, t) is the (guided) model output, whatever the objective; the sampler converts it to x0 and eps.
    x is pure noise N(0, I) at t = T-1 (the paper's schedule keeps a finite terminal sigma; zero_snr makes
    it infinite); with t_start < T-1, x is data noised to the first grid step <= t_start
    (sampling_timesteps). callback(i, t, x, x0_pred) after each step. All arithmetic in fp32.
    """
    if isinstance(sched, RectifiedFlow):
        if eta != 0:
            raise ValueError("rectified flow has the deterministic Euler sampler only (eta = 0, sampler ddim)")
        return euler_sample(fn, x, sched, steps, progress=progress, callback=callback, t_start=t_start)
    ts = sampling_timesteps(steps, t_start).tolist()
    x = x.float()
    for i, t in enumerate(_progress(ts, progress)):
        a = sched.abar[t]
        a_prev = sched.abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = sched.x0_eps(fn(x, t_batch).float(), x, t)  # predicted clean sample and noise
        # sigma of the DDIM posterior; eta=1 gives DDPM's posterior variance.
        var = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + var.sqrt() * _randn(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def euler_sample(v_fn, x, sched, steps=50, progress=False, callback=None, t_start=T - 1):
    """Rectified flow: x <- x + (s_next - s) v on diffusers' sigma grid (FlowMatchEulerDiscreteScheduler.step),
    the model called at model time s * T; x starts as pure noise at s = 1 (or data noised to the first s)."""
    sig = sched.sigmas(steps, t_start).to(x.device)
    x = x.float()
    for i in _progress(range(len(sig) - 1), progress):
        s, s_next = sig[i], sig[i + 1]
        t = s * T  # model time, as diffusers' timesteps = sigmas * num_train_timesteps
        v = v_fn(x, t.repeat(x.shape[0])).float()  # (B,) model times
        x0 = x - s * v  # predicted clean sample
        if sched.clip_x0:
            x0 = x0.clamp(-1, 1)
            v = (x - x0) / s
        x = x + (s_next - s) * v
        if callback is not None:
            callback(i, t.item(), x, x0)
    return x


def ddim_sample(fn, x, sched, steps=50, **kw):
    """Deterministic DDIM (eta = 0), N steps from t = T-1 (Euler for rectified flow)."""
    return sample(fn, x, sched, steps, eta=0.0, **kw)


def ddpm_sample(fn, x, sched, steps=T, generator=None, **kw):
    """DDPM ancestral sampling (eta = 1); steps=T is the original 1000-step chain."""
    return sample(fn, x, sched, steps, eta=1.0, generator=generator, **kw)


def cat_cond(conds):
    """Concatenate cond dicts along the batch (None stays None): one forward for all branches."""
    out = {}
    for k in conds[0]:
        vals = [c[k] for c in conds]
        out[k] = None if vals[0] is None else torch.cat(vals, dim=0)
    return out


def guided_eps_fn(model, cond, cond_s, cond_null, lam=1.0, beta=1.0):
    """Eq. 2: eps = lam (beta eps(c,s) + (1-beta) eps(0,s)) + (1-lam) eps(0,0).

    Applied to the model output whatever the objective (eps, v, x0): each converts to eps linearly at fixed
    (x_t, t), so guiding the output is guiding eps. cond: control c and semantic s; cond_s: control dropped,
    semantic kept; cond_null: both dropped. beta=1 is ordinary classifier-free guidance. Only the branches
    with non-zero weight are stacked, and they go through the model in ONE batched call per step.
    """
    branches = [(lam * beta, cond), (lam * (1 - beta), cond_s), (1 - lam, cond_null)]
    branches = [(w, c) for w, c in branches if w != 0]
    big = cat_cond([c for _, c in branches])
    n = len(branches)

    def eps_fn(x, t):
        out = model(x.repeat(n, *([1] * (x.ndim - 1))), t.repeat(n), big)  # (n*B, ...)
        parts = out.float().chunk(n, dim=0)
        return sum(w * p for (w, _), p in zip(branches, parts))

    return eps_fn


def guidance_law(lam, s):
    """Eq. 4: guidance scale for resolution factor s, lam' = 1 + s (lam - 1)."""
    return 1.0 + s * (lam - 1.0)


def snr_bin(t, bins=4):
    """Index of the noise-level bin of each model time t in [0, T] (loss-by-noise-level logs, minRF style)."""
    return (t.double() * bins / T).floor().long().clamp(0, bins - 1)
