"""Tests of the core math, diffusion.py and conditioning.py: `.venv/bin/python -m pytest -q test_core.py` (CPU, a
minute). The DDPM and rectified-flow schedules, samplers and objectives against diffusers' schedulers and closed
forms (Gaussian data, one-image data sets), zero terminal SNR, Min-SNR weights, t densities, guidance (Eq. 2) and the
Eq. 3 rescaling; gamma_c (Eq. 1, and its step following the schedule's scale), the zero-initialised control embedder,
text padding and condition dropout. Tolerances hold on every CPU: a comparison runs in float64, or its tolerance is
derived from fp32 rounding of the compared values (the fp32_tol fixture of conftest.py: ulps of their magnitude), as
the comment beside it says. The other test files follow the file they test (test_data.py, test_models.py,
test_run.py, test_train.py, test_sample.py, test_evaluate.py, test_transfer.py, test_bench.py, test_reproduce.py) and
test_readme.py checks README.md and RESULTS.md; `.venv/bin/python -m pytest -q` runs them all (about 10 minutes on 2
cores). Not covered by any: real weights (SD VAE, CLIP ViT-L/14; Inception is the real file), real ImageNet / CC12M,
real-size models in a training step, and anything on a GPU (bench.py --suite gpu)."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail at once, never retry

import pytest  # noqa: E402
import torch  # noqa: E402

import conditioning  # noqa: E402
import diffusion  # noqa: E402
import models  # noqa: E402
import transfer  # noqa: E402
from diffusion import T, Schedule  # noqa: E402


# ----------------------------------------------------------------------------- diffusion.py

def _diffusers_schedule_kwargs():
    return dict(num_train_timesteps=T, beta_schedule="scaled_linear",
                beta_start=diffusion.BETA_START, beta_end=diffusion.BETA_END)


def test_schedule_matches_diffusers(fp32_tol):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**_diffusers_schedule_kwargs())
    ours = Schedule()
    # fp32 schedules (values <= 1) compared in float64 to fp32 rounding: a few ulps of 1
    assert torch.allclose(ours.betas.double(), ref.betas.double(), atol=fp32_tol(ref.betas, 4), rtol=0)
    assert torch.allclose(ours.abar.double(), ref.alphas_cumprod.double(), atol=fp32_tol(ref.alphas_cumprod, 4), rtol=0)
    # EDM form and DDPM form of the forward process are the same thing
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = ours.abar[t].view(-1, 1, 1, 1)
    want = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(ours.q_sample(x0, t, eps), want, atol=fp32_tol(want, 8))  # fp32 rounding


def _analytic_eps(x, t):
    """A smooth, t-dependent stand-in for a network (exactly reproducible in both codes)."""
    tt = t.float().view(-1, *([1] * (x.ndim - 1))) / T
    return torch.tanh(x) * tt + 0.1 * torch.sin(3 * x) * (1 - tt)


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(steps):
    # Our spacing = diffusers' timestep_spacing="trailing" (starts at t = T-1), and the last
    # step lands on clean data: set_alpha_to_one=True. No clipping of x0.
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**_diffusers_schedule_kwargs(), clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == diffusion.sampling_timesteps(steps).tolist()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = []
    diffusion.ddim_sample(_analytic_eps, x_T.clone(), Schedule(), steps,
                          callback=lambda i, t, x, x0: ours.append(x.clone()))
    x = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        eps = _analytic_eps(x, torch.full((2,), int(t)))
        x = ref.step(eps, t, x, eta=0.0).prev_sample
        tol = 8 * (i + 1) * torch.finfo(torch.float32).eps  # fp32 rounding: ~8 ulp per step, relative to |x|
        torch.testing.assert_close(ours[i], x, rtol=tol, atol=tol, msg=lambda m: f"step {i} (t={int(t)}): {m}")


def test_partial_denoising_from_t(fp32_tol):
    # SDEdit start: the grid is cut to its steps <= t_start, and with the exact denoiser of a one-image data set
    # (eps = (x_t - sqrt(a) x0) / sqrt(1 - a)) DDIM from any start returns that image.
    assert diffusion.sampling_timesteps(50, T - 1).tolist() == diffusion.sampling_timesteps(50).tolist()
    assert diffusion.sampling_timesteps(10, 500).tolist() == [499, 399, 299, 199, 99]
    with pytest.raises(ValueError, match="below the last step"):
        diffusion.sampling_timesteps(50, 10)
    sched = Schedule()
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    def eps_exact(x, t):
        a = sched.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    seen = []
    t0 = int(diffusion.sampling_timesteps(50, 500)[0])
    x_t = sched.q_sample(x0, torch.full((2,), t0), torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    out = diffusion.ddim_sample(eps_exact, x_t, sched, 50, t_start=500, callback=lambda i, t, x, xh: seen.append(t))
    assert seen[0] == 499 and len(seen) == 25 and max(seen) <= 500
    torch.testing.assert_close(out, x0, atol=fp32_tol(x0, 512), rtol=0)  # fp32 rounding over 25 steps of 1/sqrt(abar)
    # with eps = 0 every DDIM step rescales x by sqrt(a_prev / a), so the result is x_t / sqrt(abar[first step]):
    # this pins the step the sampler starts from
    out = diffusion.ddim_sample(lambda x, t: torch.zeros_like(x), x_t, sched, 50, t_start=500)
    want = x_t / sched.abar[t0].sqrt()
    torch.testing.assert_close(out, want, atol=fp32_tol(want, 64), rtol=0)  # fp32 rounding of 25 rescalings


def test_sampler_gaussian_exact():
    # x0 ~ N(mu, s^2): x_t ~ N(sqrt(a) mu, a s^2 + 1 - a), so the optimal (posterior-mean)
    # eps predictor is E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    # Two known, non-bug biases set the parameters: (1) the quadratic schedule ends at
    # abar_{T-1} = 0.0047, not 0 (non-zero terminal SNR), so starting from N(0, I) pulls the
    # mean by ~ s*sqrt(abar_{T-1}) relative (1.7 % at s = 0.25); (2) coarse first-order steps
    # shrink the variance near sigma ~ 0.03-0.1 (DDIM, 50 steps: -20 %, 1000 steps: -1 %).
    mu, s = 1.0, 0.25
    sched = Schedule()

    def eps_opt(x, t):
        a = sched.abar[t].view(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)

    x_T = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    x0 = diffusion.ddim_sample(eps_opt, x_T, sched, T)
    assert abs(x0.mean().item() - mu) / mu < 0.02
    assert abs(x0.std().item() - s) / s < 0.02
    # DDPM ancestral sampling reaches the same distribution (its discretisation error is larger)
    x0 = diffusion.ddpm_sample(eps_opt, x_T, sched, T, generator=torch.Generator().manual_seed(1))
    assert abs(x0.mean().item() - mu) / mu < 0.02
    assert abs(x0.std().item() - s) / s < 0.03
    # and fewer steps are visibly worse, so the test would catch a broken step rule
    x0 = diffusion.ddim_sample(eps_opt, x_T, sched, 10)
    assert abs(x0.std().item() - s) / s > 0.1


def test_sampling_timesteps_every_n():
    # Regression: the float arange end test gave N+1 steps ending at t = -1 for 62 N (61, 103, ...), so the
    # model was called at t = -1 and abar[-1] wrapped to abar[999]. Every N now gives N distinct steps in 0..T-1 from
    # T-1 down, equal to diffusers' trailing spacing (which still has the extra -1 for those N: compare its first N).
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**_diffusers_schedule_kwargs(), timestep_spacing="trailing")
    for n in range(1, T + 1):
        ts = diffusion.sampling_timesteps(n).tolist()
        assert len(ts) == n and ts[0] == T - 1 and ts[-1] >= 0, n
        assert all(a > b for a, b in zip(ts, ts[1:])), n  # strictly decreasing, so distinct
        ref.set_timesteps(n)
        assert ts == ref.timesteps[:n].tolist(), n


@pytest.mark.parametrize("shift,scale", [(1.0, 1.0), (3.0, 1.0), (2.0, 1.5)])
@pytest.mark.parametrize("steps", [10, 50])
def test_rf_matches_diffusers(steps, shift, scale, fp32_tol):
    # Our rectified-flow sigmas / timesteps / Euler steps = diffusers' FlowMatchEulerDiscreteScheduler's, the model
    # called at timestep = sigma * T. Eq. 3's scale multiplies t/(1-t) as SD3's shift does: they compose.
    from diffusers import FlowMatchEulerDiscreteScheduler
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift * scale)
    ref.set_timesteps(steps)
    rf = diffusion.make_schedule("rf", shift=shift, scale=scale)
    assert rf.sigmas(steps)[-1] == 0 and rf.sigmas(steps)[0] == 1
    torch.testing.assert_close(rf.sigmas(steps), ref.sigmas, atol=fp32_tol(ref.sigmas, 8), rtol=0)  # fp32, <= 1
    torch.testing.assert_close(rf.timesteps(steps), ref.timesteps, atol=fp32_tol(ref.timesteps, 8), rtol=0)  # x1000
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours, seen = [], []
    diffusion.ddim_sample(lambda x, t: seen.append(t.clone()) or _analytic_eps(x, t), x_T.clone(), rf, steps,
                          callback=lambda i, t, x, x0: ours.append(x.clone()))
    assert len(ours) == steps and seen[0].dtype == torch.float32 and (seen[0] == T).all()  # t = 1 is pure noise
    x = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        v = _analytic_eps(x, torch.full((2,), float(t)))
        x = ref.step(v, t, x).prev_sample
        tol = 8 * (i + 1) * torch.finfo(torch.float32).eps  # fp32 rounding: ~8 ulp per step, relative to |x|
        torch.testing.assert_close(ours[i], x, rtol=tol, atol=tol, msg=lambda m: f"step {i} (t={float(t)}): {m}")
    # the shift itself, and training draws shifted times: logit(t') = logit(t) + log(shift)
    assert abs(rf.shift_t(torch.tensor(0.5)).item() - shift * scale / (1 + shift * scale)) < fp32_tol(torch.ones(1), 2)
    with pytest.raises(ValueError, match="Euler"):
        diffusion.ddpm_sample(_analytic_eps, x_T, rf, steps)


def test_rf_gaussian_exact():
    # x0 ~ N(mu, s^2), x_t = (1-t) x0 + t eps ~ N((1-t) mu, (1-t)^2 s^2 + t^2) =: N(m_t, var_t). The optimal
    # velocity is E[eps - x0 | x_t] = t r / var_t - (mu + (1-t) s^2 r / var_t), r = x_t - m_t. Rectified flow
    # reaches pure noise at t = 1 (no terminal-SNR bias); Euler's discretisation error shrinks the std (-9 % at
    # 25 steps, -0.9 % at 250).
    mu, s = 1.0, 0.25
    rf = diffusion.make_schedule("rf")
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2)) * s + mu
    eps, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(3)), torch.tensor([0.0, 250.0, 700.0, 1000.0])
    torch.testing.assert_close(rf.q_sample(x0, t, eps), (1 - t.view(-1, 1) / T) * x0 + t.view(-1, 1) / T * eps)
    torch.testing.assert_close(rf.target(x0, eps, t), eps - x0)

    def v_opt(x, t):
        tt = (t / T).view(-1, 1)
        var = (1 - tt) ** 2 * s ** 2 + tt ** 2
        r = x - (1 - tt) * mu
        return tt * r / var - (mu + (1 - tt) * s ** 2 * r / var)

    x_T = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    x0 = diffusion.ddim_sample(v_opt, x_T, rf, 250)
    assert abs(x0.mean().item() - mu) / mu < 0.02
    assert abs(x0.std().item() - s) / s < 0.02
    x0 = diffusion.ddim_sample(v_opt, x_T, rf, 10)  # a broken step rule would not show this trend
    assert abs(x0.std().item() - s) / s > 0.1


# the objectives of the DDPM schedule, with and without zero terminal SNR and x0 clipping
_DDPM_VARIANTS = [dict(objective="eps"), dict(objective="v"), dict(objective="x0"),
                  dict(objective="v", zero_snr=True), dict(objective="x0", zero_snr=True),
                  dict(objective="eps", clip_x0=True), dict(objective="v", zero_snr=True, clip_x0=True)]


@pytest.mark.parametrize("kw", _DDPM_VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_objectives_match_diffusers_ddim(kw, fp32_tol):
    # DDIM with prediction_type epsilon / v_prediction / sample, rescale_betas_zero_snr and clip_sample (eps re-derived
    # from the clipped x0: use_clipped_model_output) against diffusers, step by step, as test_ddim_matches_diffusers.
    from diffusers import DDIMScheduler
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[kw["objective"]]
    ref = DDIMScheduler(**_diffusers_schedule_kwargs(), clip_sample=kw.get("clip_x0", False), set_alpha_to_one=True,
                        timestep_spacing="trailing", prediction_type=pred,
                        rescale_betas_zero_snr=kw.get("zero_snr", False))
    ref.set_timesteps(10)
    sched = diffusion.make_schedule(**kw)
    assert torch.allclose(sched.abar.double(), ref.alphas_cumprod.double(), atol=fp32_tol(ref.alphas_cumprod, 4), rtol=0)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = []
    diffusion.ddim_sample(_analytic_eps, x_T.clone(), sched, 10, callback=lambda i, t, x, x0: ours.append(x.clone()))
    x = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        out = ref.step(_analytic_eps(x, torch.full((2,), int(t))), t, x, eta=0.0, use_clipped_model_output=True)
        x = out.prev_sample
        if kw.get("clip_x0"):
            assert out.pred_original_sample.abs().max() <= 1
        # both run in fp32 (ours casts to fp32): a tolerance from fp32 rounding, relative to |x| (eps trajectories
        # reach |x| ~ 45, where 1e-5 absolute is ~2 ulp), ~8 ulp per step over the steps so far, never absolute 1e-5
        tol = 8 * (i + 1) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(ours[i], x, rtol=tol, atol=tol, msg=lambda m: f"step {i} (t={int(t)}): {m}")


def test_zero_snr_matches_diffusers(fp32_tol):
    # Lin et al. 2024 Algorithm 1 = diffusers' rescale_zero_terminal_snr; abar_{T-1} = 0 exactly, abar_0 kept, and
    # x_{T-1} is pure noise (the EDM form's limit at sigma = inf). eps cannot be sampled there: refused.
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    base = Schedule()
    ref_betas = rescale_zero_terminal_snr(base.betas)  # fp32 both: a tolerance of a few ulps of their values
    torch.testing.assert_close(diffusion.rescale_zero_terminal_snr(base.betas), ref_betas,
                               atol=fp32_tol(ref_betas, 8), rtol=0)
    z = Schedule(objective="v", zero_snr=True)
    assert z.abar[-1] == 0 and torch.isinf(z.sigma[-1]) and abs(z.abar[0] - base.abar[0]) < fp32_tol(base.abar, 8)
    assert not torch.equal(z.abar, base.abar)
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0, 500, T - 1])
    a = z.abar[t].view(-1, 1)
    torch.testing.assert_close(z.q_sample(x0, t, eps), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.equal(z.q_sample(x0, t, eps)[2], eps[2])
    with pytest.raises(ValueError, match="zero_snr"):
        diffusion.make_schedule("eps", zero_snr=True)
    with pytest.raises(ValueError, match="zero_snr"):
        diffusion.make_schedule("rf", zero_snr=True)


def _affine(sched, t):
    """(alpha, sigma) of x_t = alpha x0 + sigma eps, (B,) each, for either schedule."""
    if isinstance(sched, diffusion.RectifiedFlow):
        s = t.float() / T
        return 1 - s, s
    a = sched.abar[t]
    return a.sqrt(), (1 - a).sqrt()


_ALL_VARIANTS = _DDPM_VARIANTS + [dict(objective="rf"), dict(objective="rf", shift=3.0, clip_x0=True)]


@pytest.mark.parametrize("kw", _ALL_VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_objectives_one_image(kw, fp32_tol):
    # The exact denoiser of a one-image data set outputs each objective's target: its training loss is 0 at every
    # t, and each objective's sampler returns the image from pure noise.
    sched = diffusion.make_schedule(**kw)
    img = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # a batch of 3 "data sets"

    def exact(x, t, cond=None):
        al, si = (_bcast(v, x) for v in _affine(sched, t))
        eps = (x - al * img) / si
        return sched.target(img, eps, t)

    t = torch.tensor([1, 300, 999]) if isinstance(sched, Schedule) else torch.tensor([1.0, 300.0, 999.0])
    loss = diffusion.loss_fn(exact, sched, img, None, t, torch.randn(3, 3, 8, 8))[0]
    assert loss < 1e-8
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = diffusion.ddim_sample(lambda x, t: exact(x, t), x_T, sched, 20)
    torch.testing.assert_close(out, img, atol=fp32_tol(img, 512), rtol=0)  # fp32 rounding over 20 steps
    # SDEdit start (sample.py --denoise-from): the grid is cut to model times <= about t_start, the image comes back
    ts = sched.timesteps(20, 500)
    assert 0 < len(ts) < 20 and 400 < ts[0] <= 501 and (len(ts) == 10 or kw.get("shift"))
    x_t = sched.q_sample(img, torch.full((3,), ts[0].item()), x_T)
    out = diffusion.ddim_sample(lambda x, t: exact(x, t), x_t, sched, 20, t_start=500)
    torch.testing.assert_close(out, img, atol=fp32_tol(img, 512), rtol=0)  # fp32 rounding over 20 steps


def _bcast(v, x):
    return v.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("kw", [dict(objective="eps"), dict(objective="v"), dict(objective="x0"),
                                dict(objective="v", zero_snr=True), dict(objective="rf"),
                                dict(objective="rf", shift=3.0)], ids=lambda kw: "-".join(map(str, kw.values())))
def test_min_snr_weight(kw, fp32_tol):
    # Min-SNR-gamma (Hang et al. 2023) is min(SNR, gamma) on the x0-space error; each objective's weighted loss must
    # equal it for the same prediction. Pinned against diffusers' compute_snr and its training scripts' formulas.
    sched = diffusion.make_schedule(**kw, loss_weight="min-snr", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    x0, eps, x0_hat = (torch.randn(6, 3, 4, 4, generator=g) for _ in range(3))
    if kw["objective"] == "rf":
        t = torch.tensor([0.5, 10.0, 200.0, 500.0, 800.0, 999.0])
        snr = ((1 - t / T) / (t / T)) ** 2
    else:
        t = torch.tensor([0, 10, 200, 500, 800, 999])
        snr = sched.abar[t] / (1 - sched.abar[t])
    al, si = (_bcast(v, x0) for v in _affine(sched, t))
    xt = al * x0 + si * eps
    out = sched.target(x0_hat, (xt - al * x0_hat) / si, t)  # the output that means "x0 = x0_hat" at x_t
    per_sample = diffusion.loss_fn(lambda *_: out, sched, x0, None, t, eps)[1]
    want = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    # fp32: x0 recovered through 1/sigma and 1/alpha (up to 1/0.068) loses ~3 digits near t = T
    torch.testing.assert_close(per_sample, want, rtol=2e-4, atol=1e-6)
    if kw == dict(objective="eps") or kw == dict(objective="v"):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import compute_snr
        snr_ref = compute_snr(DDPMScheduler(**_diffusers_schedule_kwargs()), t)
        w_ref = snr_ref.clamp(max=5.0) / (snr_ref if kw["objective"] == "eps" else snr_ref + 1)
        torch.testing.assert_close(sched.weight(t), w_ref, rtol=1e-4, atol=0)  # fp32 SNRs up to 1e3: relative
        # by hand: t = 0 has SNR = (1 - beta_0) / beta_0 = 1175.5 > 5, t = 999 has SNR = 0.0047 < 5
        snr0 = (1 - diffusion.BETA_START) / diffusion.BETA_START
        w0 = 5.0 / snr0 if kw["objective"] == "eps" else 5.0 / (snr0 + 1)
        assert abs(sched.weight(torch.tensor([0])).item() - w0) < fp32_tol(torch.ones(1), 8)  # fp32 weight <= 1
    assert diffusion.make_schedule(kw["objective"], **{k: v for k, v in kw.items() if k != "objective"}).weight(t) \
        is None  # default: unit weight


def test_t_density():
    # uniform is today's draw (same generator stream); logit-normal: logit(t/T) ~ N(m, s); rf's shift adds log(shift)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(Schedule().sample_t(64, g1), torch.randint(0, T, (64,), generator=g2))
    n = 40000
    for sched, off in [(diffusion.make_schedule("v", t_density="logit-normal", t_mean=0.5, t_std=0.8), 0.5),
                       (diffusion.make_schedule("rf", t_mean=0.5, t_std=0.8), 0.5),
                       (diffusion.make_schedule("rf", t_mean=0.5, t_std=0.8, shift=3.0), 0.5 + math.log(3.0))]:
        t = sched.sample_t(n, torch.Generator().manual_seed(1))
        u = ((t + 0.5) / T if isinstance(sched, Schedule) else t / T).double()
        assert t.min() >= 0 and t.max() <= T - (1 if isinstance(sched, Schedule) else 0)
        z = torch.log(u / (1 - u))
        assert abs(z.mean().item() - off) < 0.02 and abs(z.std().item() - 0.8) < 0.02
    t = diffusion.make_schedule("rf", t_density="uniform").sample_t(n, torch.Generator().manual_seed(1))
    assert abs(t.mean().item() - T / 2) < 5 and t.dtype == torch.float32
    assert diffusion.snr_bin(torch.tensor([0.0, 249.9, 250.0, 999.9, 1000.0])).tolist() == [0, 0, 1, 3, 3]
    assert diffusion.snr_bin(torch.tensor([0, 249, 250, 999])).tolist() == [0, 0, 1, 3]


def test_schedule_defaults_unchanged():
    # Without the new settings everything is the paper's eps-DDPM: same class, same tables, same loss.
    sched = diffusion.schedule_from_args({"schedule_scale": 1.0})
    assert isinstance(sched, Schedule) and sched.objective == "eps" and sched.weight(torch.tensor([3])) is None
    assert not sched.zero_snr and not sched.clip_x0 and sched.t_density == "uniform"
    assert torch.equal(sched.abar, Schedule().abar) and torch.equal(sched.sigma, Schedule().sigma)
    assert diffusion.schedule_spec({}) == {**diffusion.SCHEDULE_DEFAULTS, "t_density": "uniform"}
    assert diffusion.schedule_spec({"objective": "rf"})["t_density"] == "logit-normal"  # Tab. A4's SD3 density
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([5, 900])
    model = lambda x, t, c: 0.5 * x  # noqa: E731
    loss = diffusion.loss_fn(model, sched, x0, None, t, eps)[0]
    assert torch.equal(loss, (0.5 * sched.q_sample(x0, t, eps) - eps).pow(2).flatten(1).mean(1).mean())
    with pytest.raises(ValueError, match="shift"):
        diffusion.make_schedule("eps", shift=2.0)


class _CountingModel(torch.nn.Module):
    """eps depends on the semantic id and the control flag in a known, separable way."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        y = cond["y"].float().view(-1, 1)
        keep = cond["keep_ctrl"].view(-1, 1)
        return 0.1 * x + y + 10.0 * keep * cond["phi"][:, 3:4] / 64


def _conds(B=3):
    phi = torch.tensor([[0.0, 0.0, 0.0, 64.0, 48.0]]).repeat(B, 1)
    full = {"y": torch.arange(B), "phi": phi, "keep_ctrl": torch.ones(B)}
    sem = {"y": torch.arange(B), "phi": phi, "keep_ctrl": torch.zeros(B)}
    null = {"y": torch.full((B,), 7), "phi": phi, "keep_ctrl": torch.zeros(B)}
    return full, sem, null


def test_guidance_eq2(fp32_tol):
    model = _CountingModel()
    full, sem, null = _conds()
    x, t = torch.randn(3, 5), torch.full((3,), 500)
    e_cs, e_s, e_0 = model(x, t, full), model(x, t, sem), model(x, t, null)
    lam, beta = 1.5, 1.375
    # lam = 1, beta = 1: the fully conditional prediction
    assert torch.allclose(diffusion.guided_eps_fn(model, full, sem, null, 1.0, 1.0)(x, t), e_cs)
    # beta = 1: ordinary classifier-free guidance
    cfg = diffusion.guided_eps_fn(model, full, sem, null, lam, 1.0)(x, t)
    assert torch.allclose(cfg, e_0 + lam * (e_cs - e_0))
    # three branches: Eq. 2 by hand
    got = diffusion.guided_eps_fn(model, full, sem, null, lam, beta)(x, t)
    want = lam * (beta * e_cs + (1 - beta) * e_s) + (1 - lam) * e_0
    assert torch.allclose(got, want, atol=fp32_tol(want, 8))  # fp32 rounding of Eq. 2's few products
    # one model call per sampling step, whatever the number of branches
    model.calls = 0
    diffusion.ddim_sample(diffusion.guided_eps_fn(model, full, sem, null, lam, beta), x, Schedule(), 7)
    assert model.calls == 7


def test_rescale_eq3(fp32_tol):
    base, same = Schedule(), Schedule(scale=1.0)
    assert torch.equal(base.abar, same.abar) and torch.equal(base.sigma, same.sigma)
    abar = base.abar.double()
    for s, s_new in [(1.0, 2.0), (256.0, 512.0), (2.0, 1.0)]:
        eq3 = s ** 2 * abar / (s_new ** 2 + abar * (s ** 2 - s_new ** 2))  # Eq. 3 written out
        sigma_new = (s_new / s) * ((1 - abar) / abar).sqrt()
        assert torch.allclose(eq3, 1 / (1 + sigma_new ** 2), atol=1e-12, rtol=0)  # both float64
        assert torch.allclose(Schedule(scale=s_new / s).abar.double(), eq3, atol=fp32_tol(eq3, 8), rtol=1e-5)  # fp32
    # a larger scale means more noise at every t (lower SNR), as Prop. 1 wants at higher resolution
    assert (Schedule(scale=2.0).abar < base.abar).all()


def test_guidance_law():
    assert diffusion.guidance_law(1.5, 2) == 2.0  # App. C: 1.5 at 256 -> 2.0 at 512
    assert diffusion.guidance_law(1.5, 1) == 1.5
    assert diffusion.guidance_law(1.0, 4) == 1.0  # no guidance stays no guidance


# ----------------------------------------------------------------------------- conditioning.py

def test_gamma_schedules(fp32_tol):
    torch.manual_seed(0)
    T = diffusion.T
    t = torch.arange(T + 1)
    g = conditioning.gamma_c(t, "cosine", alpha=8.0)
    assert g[0] == 1 and g[-1] == 0  # clean data -> 1, pure noise (t = T) -> 0
    assert (g[1:] <= g[:-1]).all()  # monotone non-increasing in t
    # exact values of Eq. 1 (float64 reference)
    ref = [(1 - math.cos(math.pi * (1 - k / T) ** 8)) / 2 for k in range(T + 1)]
    assert torch.allclose(g.double(), torch.tensor(ref, dtype=torch.float64), atol=fp32_tol(g, 8))  # fp32 g
    assert (g[t >= 0.4 * T] < 0.01).all()  # alpha = 8: off until t/T < 0.4 ...
    assert g[int(0.2 * T)] > 0.05  # ... and on well before clean data
    assert torch.isclose(g[int(0.4 * T)].double(), torch.tensor((1 - math.cos(math.pi * 0.6 ** 8)) / 2,
                                                                dtype=torch.float64), atol=fp32_tol(g, 1))
    assert (conditioning.gamma_c(t, "uniform") == 1).all()
    assert torch.allclose(conditioning.gamma_c(t, "linear"), 1 - t / T)
    step = conditioning.gamma_c(t[:T], "step", step_sigma=1.0)
    assert torch.equal(step, (diffusion.Schedule().sigma <= 1.0).float())  # Tab. A6: delta(sigma_t <= c)
    assert step[0] == 1 and step[-1] == 0
    with pytest.raises(ValueError):
        conditioning.gamma_c(t, "bogus")


def test_step_gamma_follows_schedule_scale(randomize, train_spec):
    """Regression: the 'step' gamma_c is delta(sigma_t <= c) on the sigma the run trains with, i.e. after
    --schedule-scale (Eq. 3: sigma' = s sigma), for a model built from train.py's args as every script builds it."""
    t = torch.arange(diffusion.T)
    sigma1, sigma2 = Schedule().sigma, Schedule(2.0).sigma
    step2 = conditioning.gamma_c(t, "step", step_sigma=1.0, sigma_scale=2.0)
    assert torch.equal(step2, (sigma2 <= 1.0).float())
    window = t[(sigma1 <= 1.0) & (sigma2 > 1.0)]  # on with the unscaled sigma, off with the scaled one
    assert len(window) > 10
    phi = torch.tensor([[0.0, 0.0, 0.0, 64.0, 48.0]]).expand(len(window), 5)
    torch.manual_seed(0)
    specs = {}
    for scale, on in ((1.0, True), (2.0, False)):
        _, specs[scale] = train_spec(["--gamma", "step", "--control", "size", "--schedule-scale", str(scale),
                                      "--pe-grid", "extrapolate"])
        model = models.build_model(**specs[scale]["model"])
        randomize(model.c_embedder)  # the zero-initialised E_l would hide gamma_c
        with torch.no_grad():
            emb = model.c_embedder(phi, window)  # (n, D) = gamma_c(t) E_l(phi_l)
        assert bool((emb.abs().sum(1) > 0).all()) == on and bool((emb == 0).all()) == (not on), scale
    # a resolution transfer (2x: Eq. 3 scale 2) moves the step with the schedule
    sd = models.build_model(**specs[1.0]["model"]).state_dict()
    b = transfer.transfer_resolution(specs[1.0], sd, 2 * specs[1.0]["data"]["resolution"])[0]
    assert b["schedule"]["scale"] == b["model"]["schedule_scale"] == 2.0


def test_control_zero_init(fp32_tol):
    torch.manual_seed(0)
    phi = torch.tensor([[10.0, 3.0, 1.0, 256.0, 341.0], [0.0, 0.0, 0.0, 64.0, 48.0]])
    t = torch.tensor([17, 900])
    for signals in [("crop",), ("size",), ("flip",), ("crop", "size", "flip")]:
        for sched in conditioning.GAMMA_SCHEDULES:
            emb = conditioning.ControlEmbedder(32, signals, schedule=sched)
            out = emb(phi, t)
            assert out.shape == (2, 32) and torch.equal(out, torch.zeros(2, 32))  # exactly zero when fresh
    # the test can fail: a trained (non-zero) last layer gives a non-zero output, except where keep = 0
    emb = conditioning.ControlEmbedder(32)
    for m in (emb.E_h, emb.E_l):
        torch.nn.init.normal_(m.mlp[2].weight)
    out = emb(phi, torch.tensor([0, 0]), keep=torch.tensor([1.0, 0.0]))
    assert out[0].abs().sum() > 0 and torch.equal(out[1], torch.zeros(32))
    # gamma_c gates the low-level (size) branch: at t = T-1 only E_h contributes
    want = emb.E_h(phi[:, emb.hi_cols])
    assert torch.allclose(emb(phi, torch.tensor([999, 999])), want, atol=fp32_tol(want, 8))  # fp32 rounding


def test_text_padding_modes(fp32_tol):
    torch.manual_seed(0)
    B, L, D = 3, conditioning.TEXT_LEN, 256
    tokens = torch.randn(B, L, D) * torch.rand(1, 1, D) * 3 + 1  # channel-dependent scales
    eot = torch.tensor([4, 10, 76])
    pos = torch.arange(L)[None]
    pad = pos > eot[:, None]  # (B, L)
    z = conditioning.pad_text(tokens, eot, "zero")
    assert (z[pad] == 0).all() and torch.equal(z[~pad], tokens[~pad])
    r = conditioning.pad_text(tokens, eot, "replicate")
    for b in range(B):
        n = int(eot[b]) + 1
        assert torch.equal(r[b], tokens[b, torch.arange(L) % n])  # exact cyclic copies of SOT..EOT
    assert torch.equal(conditioning.pad_text(tokens, eot, "noisy", training=False), r)  # no noise at sampling
    beta = 0.1
    g = torch.Generator().manual_seed(0)
    noisy = conditioning.pad_text(tokens, eot, "noisy", beta=beta, training=True, generator=g)
    assert torch.equal(noisy[~pad], tokens[~pad])  # real tokens untouched
    for b in range(2):  # b = 2 fills the context: m = 1, no noise
        n = int(eot[b]) + 1
        real = tokens[b, :n]
        std_ch = real.std(0, unbiased=False)  # (D,) per-channel std over the real tokens
        m = math.ceil(L / n)
        dev = (noisy[b] - r[b])[n:] / (beta * math.sqrt(m - 1) * std_ch)  # should be N(0, 1)
        assert abs(dev.std().item() - 1) < 0.03 and abs(dev.mean().item()) < 0.03
    assert torch.equal(noisy[2], r[2])
    # the real tokenizer's EOT index: SOT + words + EOT
    enc = conditioning.TextEncoder("tiny")
    tok, pooled, eot2 = enc(["a red circle on the left", ""])
    assert tok.shape == (2, L, enc.dim) and pooled.shape == (2, enc.pooled_dim)
    assert eot2.tolist() == [7, 1]
    cond = conditioning.encode_text(enc, ["a red circle on the left"], "replicate")
    assert torch.equal(cond["text"][0, 8:16], cond["text"][0, :8])  # copies start right after EOT
    assert torch.allclose(cond["text"][0, :8], tok[0, :8], atol=fp32_tol(tok[0, :8], 64))  # fp32 tower, 2 calls
    with pytest.raises(SystemExit, match="--text-weights"):  # missing weights: one line naming the flag
        conditioning.TextEncoder("ViT-L-14", "/nonexistent/open_clip.bin", flag="--text-weights")


def test_condition_dropout_rates():
    torch.manual_seed(0)
    B, K = 40_000, 10
    cond = {"y": torch.randint(0, K, (B,)), "phi": torch.rand(B, 5)}
    null = conditioning.null_semantic(num_classes=K)
    out = conditioning.drop_conditions(cond, p_sem=0.1, p_ctrl=0.3, null_sem=null,
                                       generator=torch.Generator().manual_seed(1))
    sem, ctrl = out["y"] == K, out["keep_ctrl"] == 0
    assert abs(sem.float().mean() - 0.1) < 0.01 and abs(ctrl.float().mean() - 0.3) < 0.01
    assert abs((sem & ctrl).float().mean() - 0.03) < 0.005  # independent: joint rate = product
    assert torch.equal(out["y"][~sem], cond["y"][~sem]) and "keep_ctrl" not in cond  # input untouched
    none = conditioning.drop_conditions(cond, 0.0, 0.0, null)
    assert torch.equal(none["y"], cond["y"]) and (none["keep_ctrl"] == 1).all()
    # text mode: dropped rows carry exactly the empty-prompt features
    D = 8
    tcond = {"text": torch.randn(2000, 77, D), "pooled": torch.randn(2000, D)}
    tnull = {"text": torch.randn(1, 77, D), "pooled": torch.randn(1, D)}
    tout = conditioning.drop_conditions(tcond, 0.5, 0.5, tnull, torch.Generator().manual_seed(2))
    dropped = (tout["pooled"] == tnull["pooled"]).all(-1)
    assert abs(dropped.float().mean() - 0.5) < 0.05
    assert (tout["text"][dropped] == tnull["text"]).all()
    assert torch.equal(tout["text"][~dropped], tcond["text"][~dropped])
    # guidance branches (Eq. 2): cond_s drops control only, cond_null drops both
    c, c_s, c_null = conditioning.guidance_conds(cond, null)
    assert c is cond and torch.equal(c_s["y"], cond["y"]) and (c_s["keep_ctrl"] == 0).all()
    assert (c_null["y"] == K).all() and (c_null["keep_ctrl"] == 0).all()
