"""
Conditioning: everything a denoiser is conditioned on (paper §2.1 / §3.3 / App. C).

Embedders that live INSIDE the models (the models own these modules):
    timestep_embedding(t, dim=256, max_period=10000) -> (B, dim)      sinusoidal features, DiT convention [cos, sin]
    TimestepEmbedder(hidden, freq_dim=256)(t) -> (B, D)                .mlp = Linear -> SiLU -> Linear
    LabelEmbedder(num_classes, hidden)(y) -> (B, D)                    .embedding_table: num_classes+1 rows, last = null
    gamma_c(t, schedule="cosine", alpha=8.0, step_sigma=1.0, sigma_scale=1.0) -> (B,)   Eq. 1 low-level weight
    ControlEmbedder(hidden, signals, schedule, alpha, step_sigma, sigma_scale)(phi, t, keep=None) -> (B, D)
                                                                       Eq. 1 E_h(phi_h) + gamma_c(t) E_l(phi_l), zero-init

Helpers used OUTSIDE the models (train.py / sample.py):
    TextEncoder(name="ViT-L-14", pretrained="openai" | path | "random" | None, flag="--text-encoder-path")
        frozen open_clip text tower, 77 tokens; missing weights offline -> one-line SystemExit naming `flag`;
        TextEncoder("tiny") is a random 2-layer config for tests and CPU runs.
        enc(captions) -> (tokens (B,77,D), pooled (B,Dp), eot (B,) long)
    pad_text(tokens, eot, mode="zero"|"replicate"|"noisy", beta=0.02, training=False, generator=None) -> (B,77,D)
    encode_text(encoder, captions, padding="replicate", beta=0.02, training=False, generator=None)
        -> {"text": (B,77,D), "pooled": (B,Dp)}                       encoder + padding in one call
    drop_conditions(cond, p_sem=0.1, p_ctrl=0.1, null_sem=None, generator=None) -> cond   (training-time dropout)
    null_cond(cond, null_sem=None, drop_sem=True, drop_ctrl=True) -> cond                   (guidance branches)
    guidance_conds(cond, null_sem=None) -> (cond, cond_s, cond_null)                        (Eq. 2 inputs)
    null_semantic(num_classes=None, text_encoder=None, padding="replicate", device="cpu") -> null_sem
        class mode {"y": tensor(num_classes)}; text mode the empty prompt {"text": (1,77,D), "pooled": (1,Dp)}
    load_open_clip(name, pretrained, flag) / get_text_encoder(name, pretrained, device)   (one loader, cached)
Run-spec level (spec = run.py's run spec; sample.py, evaluate.py and train.py's grids go through these):
    semantic_encoder(sem, device) / semantic_cond(sem, labels, encoder, ...) / semantic_null(sem, encoder, device)
The run's defaults for φ, β and λ at sampling and generation itself are run.py's (this file knows nothing of the
training CLI). Imports: diffusion <- conditioning <- data, models <- run.

Example: python -c "import conditioning as c, torch; print(c.gamma_c(torch.arange(0, 1000, 100)))"
"""
import functools
import math
import os

import torch
import torch.nn as nn

import diffusion

# ----------------------------------------------------------------------------- constants (defined once)
TEXT_LEN = 77  # CLIP context length (open_clip ViT-L-14)
PHI_KEYS = ("crop_top", "crop_left", "flip", "orig_h", "orig_w")  # φ layout, original-image pixels (SDXL convention)
CROP_TOP, CROP_LEFT, FLIP, ORIG_H, ORIG_W = range(len(PHI_KEYS))  # φ's columns by name: phi[:, ORIG_H]
CONTROL_SIGNALS = ("crop", "size", "flip")  # which parts of φ a model may use
GAMMA_SCHEDULES = ("uniform", "cosine", "linear", "step")  # Eq. 1 / Tab. A4 / Tab. A6
FREQ_DIM = 256  # sinusoidal features per scalar (DiT / SDXL)
TEXT_PADDINGS = ("zero", "replicate", "noisy")  # §2.1, App. C Eq. 7
# which φ columns feed which embedder: E_h gets high-level (crop, flip), E_l low-level (size)
_SIGNAL_COLS = {"crop": (CROP_TOP, CROP_LEFT), "flip": (FLIP,), "size": (ORIG_H, ORIG_W)}


# ----------------------------------------------------------------------------- embedders used inside models
def timestep_embedding(t, dim=FREQ_DIM, max_period=10000, freq_shift=0):
    """Sinusoidal features of a (B,) tensor (DiT convention: cat[cos, sin]); works for any scalar, not only t.
    freq_shift=1 reproduces diffusers' DiT port (downscale_freq_shift=1: exponents over half-1, not half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoidal(256) -> Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, hidden, freq_dim=FREQ_DIM, freq_shift=0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class id -> vector; row num_classes is the null class used by guidance (dropout happens outside)."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)  # (B, D)


@functools.lru_cache(maxsize=8)
def _sigma(scale, device):
    """sigma_t of the schedule at Eq. 3 scale `scale`, built once per (scale, device): the 'step' gamma_c reads it
    every forward."""
    return diffusion.Schedule(scale).sigma.to(device)


def gamma_c(t, schedule="cosine", alpha=8.0, step_sigma=1.0, sigma_scale=1.0):
    """Eq. 1 weight of the low-level control embedding: 0 at pure noise (t = T), 1 at clean data (t = 0).
    sigma_scale: the schedule scale of the run (--schedule-scale, Eq. 3); only 'step' reads sigma_t."""
    t = torch.as_tensor(t).float()
    T = diffusion.T
    if schedule == "uniform":  # SDXL: size conditioning at every noise level
        return torch.ones_like(t)
    if schedule == "cosine":  # Eq. 1, Tab. A4 (alpha = 8 best, Tab. 2a)
        return (1 - torch.cos(math.pi * (1 - t / T).clamp(0, 1) ** alpha)) / 2
    if schedule == "linear":
        return (1 - t / T).clamp(0, 1)
    if schedule == "step":  # Tab. A6: delta(sigma_t <= c), sigma_t of the schedule the model trains with
        sigma = _sigma(float(sigma_scale), t.device)
        idx = t.round().long().clamp(0, T - 1)
        return (sigma[idx] <= step_sigma).float()
    raise ValueError(f"unknown gamma schedule {schedule!r}; choose from {GAMMA_SCHEDULES}")


class _ScalarMLP(nn.Module):
    """k scalars -> k sinusoidal(256) -> concat -> Linear -> SiLU -> Linear (zero-init, Tab. 2a 'zero init')."""

    def __init__(self, n_scalars, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_scalars * FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)  # zero init: a fresh control branch adds nothing
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x):  # x: (B, k)
        feats = torch.cat([timestep_embedding(x[:, i]) for i in range(x.shape[1])], dim=-1)  # (B, k*256)
        return self.mlp(feats)  # (B, D)


class ControlEmbedder(nn.Module):
    """Eq. 1: c_emb = (E_h(phi_h) + gamma_c(t) * E_l(phi_l)) * keep, added to the timestep embedding (§3.1, §3.3)."""

    def __init__(self, hidden, signals=CONTROL_SIGNALS, schedule="cosine", alpha=8.0, step_sigma=1.0, sigma_scale=1.0):
        super().__init__()
        assert all(s in CONTROL_SIGNALS for s in signals), f"signals must be from {CONTROL_SIGNALS}"
        assert schedule in GAMMA_SCHEDULES, f"schedule must be one of {GAMMA_SCHEDULES}"
        self.signals, self.schedule, self.alpha, self.step_sigma = tuple(signals), schedule, alpha, step_sigma
        self.sigma_scale = sigma_scale  # Eq. 3 scale of the run's schedule: the 'step' gamma_c thresholds its sigma
        self.hi_cols = [c for s in ("crop", "flip") if s in signals for c in _SIGNAL_COLS[s]]
        self.lo_cols = list(_SIGNAL_COLS["size"]) if "size" in signals else []
        self.E_h = _ScalarMLP(len(self.hi_cols), hidden) if self.hi_cols else None
        self.E_l = _ScalarMLP(len(self.lo_cols), hidden) if self.lo_cols else None
        self.hidden = hidden

    def forward(self, phi, t, keep=None):
        B = phi.shape[0]
        out = phi.new_zeros(B, self.hidden, dtype=torch.float32)
        if self.E_h is not None:
            out = out + self.E_h(phi[:, self.hi_cols].float())
        if self.E_l is not None:
            g = gamma_c(t, self.schedule, self.alpha, self.step_sigma, self.sigma_scale).to(phi.device)  # (B,)
            out = out + g[:, None] * self.E_l(phi[:, self.lo_cols].float())
        if keep is not None:  # dropped control (guidance) -> zero embedding
            out = out * keep.float()[:, None]
        return out  # (B, D)


# ----------------------------------------------------------------------------- text encoder (outside the models)
EOT_ID = 49407  # CLIP tokenizer end-of-text id (SOT 49406, pad 0)
# tiny random text tower for tests / CPU runs: CLIP tokenizer + 2 layers of width 64 (REFERENCES.md)
TINY_TEXT = dict(context_length=TEXT_LEN, vocab_size=49408, width=64, heads=2, layers=2, output_dim=64)
RANDOM_TEXT = "random"  # --text-encoder-path of a seeded random tower of the named config (the scale harness)


class TextEncoder(nn.Module):
    """Frozen open_clip text tower (§3: ViT-L-14 `openai`, 77 tokens): token features after ln_final + pooled EOT.

    name="tiny" builds a random 2-layer tower (seeded, so train and sample get the same one) that needs no download.
    pretrained: "openai" (hub tag), a local checkpoint path, RANDOM_TEXT (seeded random weights of the config) or
    None (unseeded random weights, any open_clip config)."""

    def __init__(self, name="ViT-L-14", pretrained="openai", flag="--text-encoder-path"):
        super().__init__()
        import open_clip  # heavy import, only needed in text mode

        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")  # ships in the wheel, works offline
        if name == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # deterministic random weights: a tiny checkpoint needs no text weights file
                tower = open_clip.transformer.TextTransformer(**TINY_TEXT, output_tokens=True)
        else:
            seeded = pretrained == RANDOM_TEXT  # the real architecture, no download; train, sample and ranks agree
            with torch.random.fork_rng(devices=[], enabled=seeded):
                if seeded:
                    torch.manual_seed(0)
                tower = load_open_clip(name, None if seeded else pretrained, flag)
            tower.visual = None  # text only: drop the image tower (saves ~300 M params of memory)
        self.tower = tower.eval().requires_grad_(False)  # frozen (§3)
        self.dim = self.tower.ln_final.weight.shape[0]  # token feature width (768 for ViT-L-14)
        proj = self.tower.text_projection
        self.pooled_dim = proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1]

    def train(self, mode=True):  # always frozen in eval mode (no dropout), whatever the caller does
        return super().train(False)

    def tokenize(self, captions):
        return self.tokenizer(list(captions))  # (B, 77) long, SOT ... EOT, 0-padded; EOT kept when truncating

    @torch.no_grad()
    def forward(self, captions):
        """captions: list[str] -> tokens (B, 77, D) after ln_final, pooled (B, Dp), eot (B,) index of EOT."""
        m = self.tower
        ids = self.tokenize(captions).to(m.positional_embedding.device)  # (B, L)
        x = m.token_embedding(ids) + m.positional_embedding  # (B, L, D)
        x = m.transformer(x, attn_mask=m.attn_mask)  # causal CLIP text transformer, batch-first
        x = m.ln_final(x)  # (B, L, D) token features after the final layer norm (§3)
        eot = (ids == EOT_ID).int().argmax(dim=-1)  # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, D) EOT feature, as CLIP
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, Dp)
        return x.float(), pooled.float(), eot


def _is_file(p):
    return isinstance(p, str) and os.path.isfile(p)


def load_open_clip(name, pretrained, flag="--text-encoder-path"):
    """open_clip model `name` with weights `pretrained` (hub tag, local file, or None = random). A tag is checked
    and fetched before 428 M parameters are built; missing weights offline -> one-line SystemExit naming `flag`.
    OpenAI's weights use QuickGELU, which open_clip 3 only warns about: forced on for them."""
    import open_clip
    if pretrained and not _is_file(pretrained):
        cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained)
        if not cfg:
            raise SystemExit(f"open_clip weights {pretrained!r} are neither a file nor an open_clip tag of {name}; "
                             f"pass {flag} /path/to/open_clip_model.bin or 'openai'")
        try:
            open_clip.pretrained.download_pretrained(cfg)
        except Exception as e:  # offline hub -> FileNotFoundError / LocalEntryNotFoundError / URLError
            raise SystemExit(f"open_clip weights {name}/{pretrained} unavailable ({type(e).__name__}); download "
                             f"them or pass {flag} /path/to/open_clip_model.bin") from None
    quick_gelu = "openai" in str(pretrained).lower()
    return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)


@functools.lru_cache(maxsize=4)
def get_text_encoder(name, pretrained, device="cpu", flag="--text-encoder-path"):
    """TextEncoder(name, pretrained) on device, built once per process (train, sample and evaluate share it)."""
    return TextEncoder(name, pretrained, flag).to(device)


def pad_text(tokens, eot, mode="replicate", beta=0.02, training=False, generator=None):
    """§2.1 / App. C Eq. 7: fill the positions after EOT of (B, L, D) token features.

    zero: 0. replicate: cyclic copies of the real tokens SOT..EOT (n = eot+1 of them).
    noisy: replicate, and in training only add beta * sqrt(m-1) * std_ch * N(0,1) to the copies, where
    std_ch (D,) is the per-channel std over the n real tokens and m = ceil(L/n) is how many times the real
    tokens appear in the padded sequence (our reading of "number of token replications": m-1 copies, so a
    prompt that needs no padding gets no noise). At sampling, noisy == replicate (no noise at inference)."""
    assert mode in TEXT_PADDINGS, f"text padding must be one of {TEXT_PADDINGS}"
    B, L, D = tokens.shape
    pos = torch.arange(L, device=tokens.device)[None]  # (1, L)
    n = (eot.to(tokens.device).long() + 1)[:, None]  # (B, 1) real tokens per prompt
    is_pad = pos >= n  # (B, L)
    if mode == "zero":
        return tokens * (~is_pad)[..., None]
    src = pos % n  # (B, L) cyclic index into the real tokens
    out = tokens.gather(1, src[..., None].expand(B, L, D))  # (B, L, D) replicated
    if mode == "noisy" and training:
        real = (~is_pad).float()[..., None]  # (B, L, 1)
        mean = (tokens * real).sum(1, keepdim=True) / n[..., None]  # (B, 1, D)
        std_ch = (((tokens - mean) ** 2 * real).sum(1, keepdim=True) / n[..., None]).sqrt()  # (B, 1, D)
        m = torch.ceil(L / n.float())[..., None]  # (B, 1, 1)
        noise = torch.randn(out.shape, generator=generator, device=out.device if generator is None else
                            generator.device).to(out.device)
        out = out + is_pad[..., None] * beta * (m - 1).sqrt() * std_ch * noise
    return out


def encode_text(encoder, captions, padding="replicate", beta=0.02, training=False, generator=None):
    """captions -> {"text": (B, 77, D) padded token features, "pooled": (B, Dp)} ready to merge into `cond`."""
    tokens, pooled, eot = encoder(captions)
    return {"text": pad_text(tokens, eot, padding, beta, training, generator), "pooled": pooled}


# ----------------------------------------------------------------------------- condition dropout and null conditions
def null_semantic(num_classes=None, text_encoder=None, padding="replicate", device="cpu"):
    """The null semantic condition: {"y": num_classes} (last table row) or the empty prompt's features."""
    if num_classes is not None:
        return {"y": torch.tensor(num_classes, device=device)}
    assert text_encoder is not None, "need num_classes (class mode) or a text_encoder (text mode)"
    return {k: v.to(device) for k, v in encode_text(text_encoder, [""], padding).items()}  # (1, 77, D), (1, Dp)


def _batch_size(cond):
    return (cond["y"] if "y" in cond else cond["text"]).shape[0]


def null_cond(cond, null_sem=None, drop_sem=True, drop_ctrl=True):
    """Copy of cond with the semantic part replaced by null_sem and/or the control switched off (keep_ctrl = 0)."""
    out, B = dict(cond), _batch_size(cond)
    if drop_sem:
        assert null_sem is not None, "dropping the semantic condition needs null_sem (see null_semantic)"
        for k, v in null_sem.items():
            out[k] = v.to(cond[k].device).expand(B, *cond[k].shape[1:]).clone()
    if drop_ctrl:
        out["keep_ctrl"] = torch.zeros(B, device=(cond["y"] if "y" in cond else cond["text"]).device)
    return out


def guidance_conds(cond, null_sem):
    """Eq. 2 inputs: (cond = control + semantic, cond_s = control dropped, cond_null = both dropped)."""
    return cond, null_cond(cond, null_sem, drop_sem=False), null_cond(cond, null_sem)


def drop_conditions(cond, p_sem=0.1, p_ctrl=0.1, null_sem=None, generator=None):
    """Training-time condition dropout for guidance (§3, Eq. 2): semantic with p_sem -> null_sem, control with p_ctrl
    -> keep_ctrl = 0, drawn independently per sample. Returns a new dict; the input is not modified."""
    B = _batch_size(cond)
    dev = (cond["y"] if "y" in cond else cond["text"]).device
    gdev = generator.device if generator is not None else dev
    u = torch.rand(2, B, generator=generator, device=gdev).to(dev)  # (2, B): independent draws
    out = dict(cond)
    drop_sem = u[0] < p_sem
    if p_sem > 0:
        nul = null_cond(cond, null_sem, drop_sem=True, drop_ctrl=False)
        for k in null_sem:
            mask = drop_sem.view(B, *([1] * (cond[k].ndim - 1)))
            out[k] = torch.where(mask, nul[k], cond[k])
    keep = cond.get("keep_ctrl", torch.ones(B, device=dev)).float()
    out["keep_ctrl"] = keep * (u[1] >= p_ctrl).float()
    return out


# ----------------------------------------------------------------------------- the run spec's semantic condition
# spec["semantic"] (train.py): {"kind": "class", "num_classes": N, "null_id": N} or {"kind": "text", "encoder",
# "pretrained", "pad", "beta_txt", "dim", "pooled_dim"}. Scripts encode, pad and null through these three.
def semantic_encoder(sem, device="cpu"):
    """The frozen text encoder of a text-mode spec (cached), None in class mode."""
    return get_text_encoder(sem["encoder"], sem["pretrained"], str(device)) if sem["kind"] == "text" else None


def semantic_cond(sem, labels, encoder=None, device="cpu", training=False, generator=None):
    """Class ids or captions -> the semantic part of `cond` (text: frozen features + padding, outside the model)."""
    if sem["kind"] == "class":
        return {"y": torch.as_tensor(labels, dtype=torch.long).to(device)}
    return encode_text(encoder, list(labels), sem["pad"], sem["beta_txt"], training, generator)


def semantic_null(sem, encoder=None, device="cpu"):
    """What semantic dropout and guidance substitute: the null class id, or the empty prompt's padded features."""
    if sem["kind"] == "class":
        return {"y": torch.tensor(sem["null_id"], device=device)}
    return null_semantic(text_encoder=encoder, padding=sem["pad"], device=device)
