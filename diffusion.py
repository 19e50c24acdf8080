"""Diffusion: noise schedule, forward process, eps loss, DDIM/DDPM samplers, guidance.

SPEC §2 / paper App. C. Discrete DDPM with T = 1000 "quadratic" betas, written in the
EDM view x_t = (x0 + sigma_t * eps) / sqrt(1 + sigma_t^2). Models never see the
schedule: they get (x_t, t, cond) and predict eps; everything about sigma lives here.

    from diffusion import Schedule, loss_fn, ddim_sample
    sched = Schedule(scale=2.0)          # Eq. 3: 256 -> 512 px keeps per-token SNR
    loss, per_sample, t = loss_fn(model, sched, x0, cond)

All schedule math is float64 -> float32 and device neutral (`sched.to(device)`).
"""
import torch

# Constants of the paper's schedule (App. C, Tab. A4: beta_min 0.00085, beta_max 0.012).
T = 1000
BETA_START = 0.00085
BETA_END = 0.012


class Schedule:
    """Quadratic beta schedule, optionally rescaled for resolution (Eq. 3, Prop. 1).

    scale = s'/s. Eq. 3 (abar' = s^2 abar / (s'^2 + abar (s^2 - s'^2))) is the same as
    multiplying the EDM noise level by the scale: sigma' = (s'/s) sigma, abar' = 1/(1+sigma'^2).
    The same object (same scale) must be used for training and sampling.
    """

    def __init__(self, scale=1.0, device="cpu"):
        self.scale = float(scale)
        # "scaled_linear" in diffusers: linear in sqrt(beta), then squared (quadratic). Computed
        # in fp32 exactly as diffusers does, so checkpoints trained there see the same abar
        # (an fp64 cumprod differs by up to 5e-7); rescaling is then done in fp64.
        betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float32) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0).double()
        sigma = ((1.0 - abar) / abar).sqrt() * self.scale  # EDM noise level, rescaled
        self.betas = betas.to(device)  # of the unscaled schedule, for reference
        self.sigma = sigma.float().to(device)
        self.abar = (1.0 / (1.0 + sigma ** 2)).float().to(device)

    def to(self, device):
        self.betas, self.sigma, self.abar = (v.to(device) for v in (self.betas, self.sigma, self.abar))
        return self

    def q_sample(self, x0, t, eps):
        """x_t = (x0 + sigma_t eps) / sqrt(1 + sigma_t^2)  (= sqrt(abar) x0 + sqrt(1-abar) eps)."""
        sigma = self.sigma[t].view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
        return (x0 + sigma * eps) / (1.0 + sigma ** 2).sqrt()


def rescale_abar(abar, s, s_new):
    """Eq. 3 written out, for the test and for readers: abar at scale s -> scale s_new."""
    return s ** 2 * abar / (s_new ** 2 + abar * (s ** 2 - s_new ** 2))


def loss_fn(model, sched, x0, cond, t=None, eps=None):
    """Plain eps-MSE (SDXL / paper Tab. A4).

    Tab. A4 lists the loss weight as sigma_t^-2: ||eps_hat - eps||^2 equals
    sigma_t^-2 ||x0_hat - x0||^2 in x0 space (EDM view), so the plain eps-MSE *is* that
    weighting; no extra factor is applied. Returns (mean loss, per-sample loss (B,), t (B,)).
    """
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, T, (B,), device=x0.device)  # t ~ U{0..T-1}
    if eps is None:
        eps = torch.randn_like(x0)
    xt = sched.q_sample(x0, t, eps)
    pred = model(xt, t, cond)
    per_sample = (pred.float() - eps.float()).pow(2).flatten(1).mean(1)  # (B,), fp32 reduction
    return per_sample.mean(), per_sample, t


def sampling_timesteps(steps, t_start=T - 1):
    """N evenly spaced timesteps starting at T-1: diffusers' "trailing" spacing.

    round(arange(T, 0, -T/N)) - 1, e.g. N=10 -> [999, 899, ..., 99]. The step after the last
    one lands on clean data (abar = 1), i.e. DDIMScheduler(set_alpha_to_one=True).
    t_start < T-1 keeps the steps <= t_start (SDEdit-style partial denoising from data noised
    to the first kept step), e.g. N=10, t_start=500 -> [499, 399, ..., 99].
    """
    grid = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).long()
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


@torch.no_grad()
def sample(eps_fn, x, sched, steps=50, eta=0.0, generator=None, progress=False, callback=None, t_start=T - 1):
    """Generalised DDIM (Song et al. 2021): eta=0 is DDIM, eta=1 is DDPM ancestral.

    x is pure noise N(0, I) at t = T-1 (the schedule's terminal sigma is finite, as in the
    paper: no zero-SNR fix); with t_start < T-1, x is data noised to the first grid step
    <= t_start (sampling_timesteps). All arithmetic in fp32.
    """
    ts = sampling_timesteps(steps, t_start).tolist()
    it = ts
    if progress:
        from tqdm import tqdm
        it = tqdm(ts, desc="sampling", leave=False)
    x = x.float()
    for i, t in enumerate(it):
        a = sched.abar[t]
        a_prev = sched.abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_batch).float()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # predicted clean sample
        # sigma of the DDIM posterior; eta=1 gives DDPM's posterior variance.
        var = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + var.sqrt() * _randn(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddim_sample(eps_fn, x, sched, steps=50, **kw):
    """Deterministic DDIM (eta = 0), N steps from t = T-1."""
    return sample(eps_fn, x, sched, steps, eta=0.0, **kw)


def ddpm_sample(eps_fn, x, sched, steps=T, generator=None, **kw):
    """DDPM ancestral sampling (eta = 1); steps=T is the original 1000-step chain."""
    return sample(eps_fn, x, sched, steps, eta=1.0, generator=generator, **kw)


def cat_cond(conds):
    """Concatenate cond dicts along the batch (None stays None): one forward for all branches."""
    out = {}
    for k in conds[0]:
        vals = [c[k] for c in conds]
        out[k] = None if vals[0] is None else torch.cat(vals, dim=0)
    return out


def guided_eps_fn(model, cond, cond_s, cond_null, lam=1.0, beta=1.0):
    """Eq. 2: eps = lam (beta eps(c,s) + (1-beta) eps(0,s)) + (1-lam) eps(0,0).

    cond: control c and semantic s; cond_s: control dropped, semantic kept; cond_null: both
    dropped. beta=1 is ordinary classifier-free guidance. Only the branches with non-zero
    weight are stacked, and they go through the model in ONE batched call per step.
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
    """Index of the noise-level bin of each t (for loss-by-noise-level logs, minRF style)."""
    return (t * bins // T).clamp(max=bins - 1)
