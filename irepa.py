"""
iREPA in one file: SiT + REPA/iREPA alignment, its objectives, samplers and spatial metrics.

iREPA ("What matters for Representation Alignment: Global Information or Spatial Structure?", arXiv 2512.10794) makes
two changes to REPA: the 3-layer MLP projector becomes one 3x3 convolution on the token grid, and the teacher tokens
get a spatial z-score over the token axis, y = (f - gamma * mean_T f) / (std_T f + 1e-6).

Read top to bottom: the model, the spatial normalization and losses, the samplers, the spatial-structure metrics.
Conventions (fixed, see DESIGN.md): time runs data -> noise, x_t = (1 - t) x + t eps, the network predicts the
velocity v = eps - x, samplers integrate t from 1 to 0; the null label is index `num_classes`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The two recipes of the paper. Every knob stays overridable from the command line.
RECIPES = {
    'repa':  dict(projector='mlp',  spnorm='none',   proj_coeff=0.5),  # REPA: MLP, raw teacher tokens, lambda 0.5
    'irepa': dict(projector='conv', spnorm='zscore', proj_coeff=1.0),  # iREPA: 3x3 conv, spatial z-score, lambda 1.0
}

# -----------------------------------------------------------------------------
# SiT: a DiT-style transformer with adaLN-Zero blocks, predicting the velocity


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D) with per-image (N, D) shift/scale


def timestep_embedding(t, dim=256, max_period=10000):
    """[cos, sin] of `dim // 2` frequencies of the raw t in [0, 1] (no x1000, unlike DDPM-style models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)  # (N, dim)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embedding (MAE): first half encodes the column, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    row, col = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')  # token k = row * grid + col

    def emb1d(pos):
        a = pos.flatten().double()[:, None] * omega[None]  # (T, dim/4)
        return torch.cat([a.sin(), a.cos()], dim=1)  # (T, dim/2)
    return torch.cat([emb1d(col), emb1d(row)], dim=1).float().unsqueeze(0)  # (1, T, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_size=256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_size))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index `num_classes`, for the null label used by classifier-free guidance."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, train):
        if train and self.dropout_prob > 0:  # label dropout happens here, in train mode only
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"SiT was built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D), row-major tokens


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hd)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class SiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c gives shift, scale and gate of both branches; gates start at zero."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class Projector(nn.Module):
    """Maps SiT tokens (N, T, D) to one teacher's width (N, T, z_dim).

    'mlp' (REPA) acts on each token alone: Linear-SiLU-Linear-SiLU-Linear. 'conv' (iREPA) is a single k x k
    convolution on the row-major token grid, no activation, so each output token also sees its neighbours.
    """
    def __init__(self, kind, hidden_size, z_dim, projector_dim=2048, kernel=3):
        super().__init__()
        if kind == 'mlp':
            self.projection_layer = nn.Sequential(
                nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                nn.Linear(projector_dim, z_dim))
        elif kind == 'conv':
            if kernel % 2 == 0:
                raise ValueError(f"conv projector kernel must be odd to keep the token grid, got {kernel}")
            self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel, padding=kernel // 2)
        else:
            raise ValueError(f"unknown projector {kind!r}; accepted: 'mlp' (REPA), 'conv' (iREPA)")
        self.kind = kind

    def forward(self, x):
        if self.kind == 'mlp':
            return self.projection_layer(x)
        N, T, D = x.shape
        H = math.isqrt(T)
        if H * H != T:
            raise ValueError(f"the conv projector needs a square token grid, got T={T} tokens")
        x = x.view(N, H, H, D).permute(0, 3, 1, 2)  # (N, D, H, W) as a channels-last view: no copy
        return self.projection_layer(x).permute(0, 2, 3, 1).reshape(N, T, -1)  # (N, T, z_dim)


class SiT(nn.Module):
    """SiT with one projector per teacher on the output of block `encoder_depth` (1-based, before any norm)."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, qk_norm=False,
                 encoder_depth=8, z_dims=(768,), projector='conv', proj_kernel=3, projector_dim=2048):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in 1..{depth} (the block whose output is aligned), got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, input_size // patch_size))  # fixed, (1, T, D)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([Projector(projector, hidden_size, z, projector_dim, proj_kernel) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # xavier for every Linear, projector MLP included; the conv projector keeps torch's init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # patch embedding initialised like a Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x):
        p, C = self.patch_size, self.in_channels
        N, T, _ = x.shape
        h = math.isqrt(T)
        x = x.view(N, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, h * p)

    def forward(self, x, t, y, align=True):
        """x (N, C, H, W) at times t (N,) with labels y (N,) -> velocity (N, C, H, W) and [projected tokens (N, T, z)]."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if align and i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}  # depth, width, heads
SiT_models = {f'SiT-{s}/{p}': (lambda d, h, n, p: lambda **kw: SiT(depth=d, hidden_size=h, num_heads=n, patch_size=p, **kw))(d, h, n, p)
              for s, (d, h, n) in SIZES.items() for p in (2, 4, 8)}


def build_sit(name, **kwargs):
    """SiT_models[name](**kwargs) with an error that lists the sizes; encoder_depth defaults to 4 (S, B) or 8 (L, XL)."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(SiT_models)}")
    if kwargs.get('encoder_depth') is None:
        kwargs['encoder_depth'] = 4 if SIZES[name[4:].split('/')[0]][0] == 12 else 8
    return SiT_models[name](**kwargs)


def load_state(model, state_dict, what='checkpoint'):
    """load_state_dict(strict=True), but a mismatch says which keys and shapes differ instead of a wall of text."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the {what}, {tuple(own[k].shape)} in the model"
              for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        lines = [f"the {what} was made for another model config:"]
        if missing:
            lines.append(f"  missing from the {what} ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        lines += ['  ' + s for s in sorted(shapes)[:6]]
        raise ValueError('\n'.join(lines))
    model.load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# Spatial normalization of the teacher tokens, and the losses


def spatial_norm(f, gamma=0.6, eps=1e-6):
    """iREPA's spatial z-score of teacher tokens (B, T, D): over the token axis, per image and channel.

    gamma < 1 keeps part of the global (mean) component; the std is unbiased and eps is added to it (official code).
    """
    f = f.float()
    return (f - gamma * f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + eps)


def teacher_targets(feats, spnorm='zscore', gamma=0.6):
    """The alignment targets: each teacher's patch tokens, spatially normalized or not ('none' = REPA)."""
    if spnorm not in ('none', 'zscore'):
        raise ValueError(f"unknown spatial norm {spnorm!r}; accepted: 'none', 'zscore'")
    return [spatial_norm(f, gamma) if spnorm == 'zscore' else f for f in feats]


def interpolate(x, noise, t):
    """The linear path: x_t = (1 - t) x + t eps, so t = 0 is data and t = 1 is noise; its velocity is eps - x."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def alignment_loss(zs, targets):
    """Mean over teachers, images and tokens of -cos(projected, target); -1 is perfect alignment."""
    if not zs:
        return torch.zeros(())
    cos = [(F.normalize(z.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1).mean() for z, y in zip(zs, targets)]
    return -torch.stack(cos).mean()


def flow_loss(model, x, y, targets):
    """Flow matching with uniform t and velocity target, plus alignment: returns (flow MSE, alignment loss)."""
    t = torch.rand(x.shape[0], device=x.device)
    noise = torch.randn_like(x)
    v, zs = model(interpolate(x, noise, t), t, y, align=bool(targets))
    return F.mse_loss(v.float(), (noise - x).float()), alignment_loss(zs, targets).to(x.device)


# -----------------------------------------------------------------------------
# Samplers: Euler / Heun ODE and Euler-Maruyama SDE, t from 1 to 0, state in float64 (as the official code)


@torch.no_grad()
def sample(model, noise, y, mode='sde', num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
           generator=None):
    """Generate latents from `noise` (t = 1) with labels y. mode: 'euler', 'heun' (ODE) or 'sde' (Euler-Maruyama).

    Classifier-free guidance acts on all channels, only while guidance_low <= t <= guidance_high, with the cond and
    uncond halves in one batch. The SDE uses w(t) = 2t on the grid linspace(1, 0.04, num_steps) and a last,
    deterministic step to 0; its noise comes from `generator` (float64 draws, one per stochastic step).
    """
    if model.training:
        raise ValueError("sample with the model in eval mode (the EMA model): train mode drops labels at random")
    if mode not in ('euler', 'heun', 'sde'):
        raise ValueError(f"unknown sampler {mode!r}; accepted: 'euler', 'heun', 'sde'")
    dtype, device = noise.dtype, noise.device
    y_null = torch.full_like(y, model.num_classes)

    def velocity(x, t, guided):  # x (B, C, H, W) float64, t a python float -> (B, C, H, W) float64
        if guided:  # cond and uncond in one batch
            x, yy = torch.cat([x, x]), torch.cat([y, y_null])
        else:
            yy = y
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=device).to(dtype)
        v = model(x.to(dtype), t_in, yy, align=False)[0].double()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v

    def guided(t):
        return cfg_scale > 1.0 and guidance_low <= t <= guidance_high

    x = noise.double()
    if mode in ('euler', 'heun'):
        ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            d = velocity(x, t, guided(t))
            x_next = x + (t_next - t) * d
            if mode == 'heun' and i < num_steps - 1:  # 2nd-order correction, skipped on the last step
                x_next = x + (t_next - t) * 0.5 * (d + velocity(x_next, t_next, guided(t)))
            x = x_next
        return x.to(dtype)

    def drift(x, t):  # SDE drift d = v - 1/2 w(t) score, score from the velocity on the linear path
        v = velocity(x, t, guided(t))  # guidance on v equals guidance on the drift: the drift is affine in v
        score = ((t - 1) * v - x) / t
        return v - 0.5 * (2 * t) * score

    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]).tolist()
    for t, t_next in zip(ts[:-2], ts[1:-1]):
        dt = t_next - t
        eps = torch.randn(x.shape, dtype=torch.float64, generator=generator, device=device if generator is None else generator.device).to(device)
        x = x + drift(x, t) * dt + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps
    t, t_next = ts[-2], ts[-1]
    return (x + drift(x, t) * (t_next - t)).to(dtype)  # last step: the mean, no noise


# -----------------------------------------------------------------------------
# Spatial-structure metrics of patch tokens (the paper's predictors of FID), vectorised over the batch


@torch.no_grad()
def spatial_metrics(feats, masks=None, far_dist=6, dmax=8, d_pos=1, d_neg=6):
    """Per-image LDS, CDS, SRSS and RMSC of tokens (B, T, D) on a square, row-major grid; returns a dict of (B,) tensors.

    K is the cosine similarity of two tokens, d their Manhattan distance on the grid.
    LDS  = mean K over 4-neighbours - mean K over pairs with d >= far_dist.
    CDS  = -slope of the least-squares line through (d, mean K at distance d), d = 1..dmax.
    SRSS = mean over foreground anchors of [mean K to foreground tokens at d <= d_pos - mean K to background tokens at
           d >= d_neg]; NaN without masks, with < 2 foreground or no background tokens (average it with nanmean).
    RMSC = sqrt(mean over tokens of |x - mean_T x|^2) for the L2-normalized tokens x; in [0, 1].
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be (B, T, D) tokens, got shape {tuple(feats.shape)}")
    B, T, _ = feats.shape
    H = math.isqrt(T)
    if H * H != T:
        raise ValueError(f"the tokens must lie on a square grid, got T={T} (not a square number)")
    if masks is not None and tuple(masks.shape) != (B, T):
        raise ValueError(f"masks must be (B, T) = {(B, T)} foreground flags, one per token; got {tuple(masks.shape)}")
    u = F.normalize(feats.float(), dim=-1, eps=1e-8)
    K = u @ u.transpose(1, 2)  # (B, T, T)
    rc = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing='ij'), -1).view(T, 2).to(feats.device)
    dist = (rc[:, None] - rc[None]).abs().sum(-1)  # (T, T) Manhattan distance
    g = u.view(B, H, H, -1)  # (B, H, W, D)
    local = torch.cat([(g[:, 1:] * g[:, :-1]).sum(-1).flatten(1), (g[:, :, 1:] * g[:, :, :-1]).sum(-1).flatten(1)], 1)
    far = dist >= far_dist
    out = {'lds': local.mean(1) - K.masked_fill(~far, 0).sum((1, 2)) / far.sum().clamp(min=1)}
    ds = [d for d in range(1, dmax + 1) if (dist == d).any()]
    S = torch.stack([K[:, dist == d].mean(1) for d in ds], 1)  # (B, len(ds)) mean similarity at each distance
    x0 = torch.tensor(ds, dtype=S.dtype, device=S.device)
    x0 = x0 - x0.mean()
    out['cds'] = -((S - S.mean(1, keepdim=True)) @ x0) / (x0 @ x0).clamp(min=1e-12)
    if masks is None:
        out['srss'] = torch.full((B,), float('nan'), device=feats.device)
    else:
        fg = masks.bool().to(feats.device)  # (B, T)
        pos = fg[:, :, None] & fg[:, None, :] & ((dist >= 1) & (dist <= d_pos))  # (B, T, T) anchor FG, partner FG, near
        neg = fg[:, :, None] & ~fg[:, None, :] & (dist >= d_neg)  # anchor FG, partner BG, far
        n_pos, n_neg = pos.sum(2), neg.sum(2)  # (B, T)
        delta = (K * pos).sum(2) / n_pos.clamp(min=1) - (K * neg).sum(2) / n_neg.clamp(min=1)
        valid = fg & (n_pos > 0) & (n_neg > 0)
        srss = (delta * valid).sum(1) / valid.sum(1)  # 0/0 = NaN when no anchor qualifies
        out['srss'] = srss.masked_fill((fg.sum(1) < 2) | ((~fg).sum(1) < 1), float('nan'))
    out['rmsc'] = (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()
    return out
