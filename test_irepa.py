"""Tests for irepa: parity with the official code, invariants with known answers, round trips. CPU, minutes.

Run: python -m pytest -q test_irepa.py
The parity vectors come from IREPA_PARITY_VECTORS (default ../shared/vectors/official_parity.safetensors).
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import irepa

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)


def vectors_path():
    if os.environ.get('IREPA_PARITY_VECTORS'):
        return Path(os.environ['IREPA_PARITY_VECTORS'])
    for p in (HERE.parent / 'shared/vectors/official_parity.safetensors', HERE / 'shared/vectors/official_parity.safetensors'):
        if p.exists():
            return p
    pytest.skip('no parity vectors: set IREPA_PARITY_VECTORS to official_parity.safetensors')


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def tiny_sit(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=10,
                encoder_depth=2, z_dims=(24,), projector='conv', projector_dim=48)
    return irepa.SiT(**{**base, **kw})


def randomize(model, seed=0):
    """Official init zeroes the output layers, which would make most comparisons vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# -----------------------------------------------------------------------------
# Parity with the official iREPA code (vectors made by running it on random weights)


def sit_from_official(c):
    """Our SiT from the keyword arguments given to the official SiT(...) constructor."""
    return irepa.SiT(input_size=c['input_size'], patch_size=c['patch_size'], in_channels=c['in_channels'],
                     hidden_size=c['hidden_size'], depth=c['depth'], num_heads=c['num_heads'],
                     mlp_ratio=c['mlp_ratio'], num_classes=c['num_classes'],
                     class_dropout_prob=c['class_dropout_prob'], qk_norm=c['qk_norm'],
                     encoder_depth=c['encoder_depth'], z_dims=c['z_dims'], projector=c['projection_layer_type'],
                     proj_kernel=c.get('proj_kwargs_kernel_size', 3), projector_dim=c.get('projector_dim', 2048))


def check_parity(path, tol=1e-5):
    V = load_file(str(path))
    with safe_open(str(path), 'pt') as f:
        cfg = json.loads(f.metadata()['config'])
    models = {}
    for tag in ('conv', 'mlp'):
        model = sit_from_official(cfg[tag])
        prefix = f'{tag}.state.'
        irepa.load_state(model, {k[len(prefix):]: v for k, v in V.items() if k.startswith(prefix)})  # strict
        model.eval()
        with torch.no_grad():
            out, zs = model(V[f'{tag}.x'], V[f'{tag}.t'], V[f'{tag}.y'])
        assert rel_err(out, V[f'{tag}.out']) <= tol, tag
        assert len(zs) == len(cfg[tag]['z_dims'])
        for k, z in enumerate(zs):
            assert z.shape == V[f'{tag}.zs.{k}'].shape
            assert rel_err(z, V[f'{tag}.zs.{k}']) <= tol, f'{tag}.zs.{k}'
        models[tag] = model
    spnorm_keys = [k for k in V if k.startswith('spnorm.gamma')]
    assert spnorm_keys
    for k in spnorm_keys:
        assert rel_err(irepa.spatial_norm(V['spnorm.in'], float(k[len('spnorm.gamma'):])), V[k]) <= tol, k
    for run, s in cfg['sampler'].items():
        x = irepa.sample(models['conv'], V['sampler.latents'], V['sampler.y'], mode='heun' if s['heun'] else 'euler',
                         num_steps=s['num_steps'], cfg_scale=s['cfg_scale'], guidance_low=s.get('guidance_low', 0.0),
                         guidance_high=s.get('guidance_high', 1.0))
        assert rel_err(x, V[f'sampler.{run}']) <= tol, run
    for run, s in cfg['sde'].items():
        if run == 'seed':
            continue
        g = torch.Generator().manual_seed(cfg['sde']['seed'])
        x = irepa.sample(models['conv'], V['sampler.latents'], V['sampler.y'], mode='sde', num_steps=s['num_steps'],
                         cfg_scale=s['cfg_scale'], guidance_low=s.get('guidance_low', 0.0),
                         guidance_high=s.get('guidance_high', 1.0), generator=g)
        assert rel_err(x, V[f'sde.{run}']) <= tol, run
    mc = cfg['metrics']
    feats = V['metrics.feats']
    assert feats.shape[1] == mc['grid'][0] * mc['grid'][1]
    m = irepa.spatial_metrics(feats, V['metrics.masks'], far_dist=mc['lds']['far_dist'], dmax=mc['cds']['dmax'],
                              d_pos=mc['srss']['d_pos'], d_neg=mc['srss']['d_neg'])
    for k in ('lds', 'cds', 'srss', 'rmsc'):
        torch.testing.assert_close(m[k], V[f'metrics.{k}'], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)


def test_parity_with_official_vectors():
    check_parity(vectors_path())


def test_parity_check_reads_everything_from_metadata(tmp_path):
    """A vectors file with other sizes (two teachers, another grid, qk-norm) goes through the same check.

    The outputs here come from our own code, so this guards the test, not the model: it fails if the parity check
    hard-codes a size, a teacher count or a run name.
    """
    torch.manual_seed(0)
    common = dict(hidden_size=48, depth=3, num_heads=3, input_size=12, encoder_depth=3, z_dims=[20, 36], patch_size=2,
                  in_channels=3, num_classes=7, class_dropout_prob=0.1, mlp_ratio=2.0, qk_norm=True)
    cfg = {'conv': {**common, 'projection_layer_type': 'conv', 'proj_kwargs_kernel_size': 5},
           'mlp': {**common, 'projection_layer_type': 'mlp', 'projector_dim': 40},
           'sampler': {'heun3_cfg2': dict(num_steps=3, heun=True, cfg_scale=2.0, guidance_low=0.1, guidance_high=0.9)},
           'sde': {'seed': 3, 'sde4': dict(num_steps=4, cfg_scale=1.0)},
           'metrics': {'grid': [6, 6], 'lds': {'far_dist': 3}, 'cds': {'dmax': 4}, 'srss': {'d_pos': 1, 'd_neg': 3}}}
    V = {}
    for tag in ('conv', 'mlp'):
        m = randomize(sit_from_official(cfg[tag]), seed=len(tag)).eval()
        V.update({f'{tag}.state.{k}': v for k, v in m.state_dict().items()})
        x, t, y = torch.randn(2, 3, 12, 12), torch.rand(2), torch.tensor([1, 7])
        out, zs = m(x, t, y)
        V.update({f'{tag}.x': x, f'{tag}.t': t, f'{tag}.y': y, f'{tag}.out': out.detach()})
        V.update({f'{tag}.zs.{k}': z.detach() for k, z in enumerate(zs)})
        if tag == 'conv':
            conv = m
    V['sampler.latents'], V['sampler.y'] = torch.randn(2, 3, 12, 12), torch.tensor([0, 6])
    V['sampler.heun3_cfg2'] = irepa.sample(conv, V['sampler.latents'], V['sampler.y'], 'heun', 3, 2.0, 0.1, 0.9)
    V['sde.sde4'] = irepa.sample(conv, V['sampler.latents'], V['sampler.y'], 'sde', 4,
                                 generator=torch.Generator().manual_seed(3))
    V['spnorm.in'] = torch.randn(3, 9, 5)
    V['spnorm.gamma0.3'] = irepa.spatial_norm(V['spnorm.in'], 0.3)
    V['metrics.feats'], V['metrics.masks'] = torch.randn(4, 36, 8), (torch.rand(4, 36) < 0.5).long()
    m = irepa.spatial_metrics(V['metrics.feats'], V['metrics.masks'], far_dist=3, dmax=4, d_neg=3)
    V.update({f'metrics.{k}': v for k, v in m.items()})
    path = tmp_path / 'other.safetensors'
    save_file({k: v.contiguous() for k, v in V.items()}, str(path), metadata={'config': json.dumps(cfg)})
    check_parity(path)
    V['conv.out'] = V['conv.out'] * 1.001  # and the check is not a no-op
    save_file({k: v.contiguous() for k, v in V.items()}, str(path), metadata={'config': json.dumps(cfg)})
    with pytest.raises(AssertionError):
        check_parity(path)


# -----------------------------------------------------------------------------
# Model invariants


def test_param_counts_match_official():
    expected = {'SiT-S/2': 32_957_200, 'SiT-B/2': 130_500_112, 'SiT-L/2': 458_086_416, 'SiT-XL/2': 675_111_184}
    for name, n in expected.items():
        with torch.device('meta'):
            m = irepa.build_sit(name, z_dims=())
        assert sum(p.numel() for p in m.parameters()) + m.pos_embed.numel() == n, name
    with torch.device('meta'):
        assert irepa.build_sit('SiT-B/2').encoder_depth == 4 and irepa.build_sit('SiT-XL/2').encoder_depth == 8
        assert irepa.build_sit('SiT-S/4').blocks[0].attn.num_heads == 6


def test_official_state_dict_keys():
    """The names of the official/REPA SiT, so that released checkpoints load with strict=True."""
    keys = set(tiny_sit(depth=1, encoder_depth=1).state_dict())
    for k in ('x_embedder.proj.weight', 't_embedder.mlp.0.weight', 't_embedder.mlp.2.bias', 'pos_embed',
              'y_embedder.embedding_table.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.attn.proj.bias',
              'blocks.0.mlp.fc1.weight', 'blocks.0.adaLN_modulation.1.weight', 'final_layer.linear.weight',
              'final_layer.adaLN_modulation.1.bias', 'projectors.0.projection_layer.weight'):
        assert k in keys, k
    assert 'projectors.0.projection_layer.4.weight' in tiny_sit(projector='mlp').state_dict()


def test_zero_init_and_identity_blocks():
    """adaLN-Zero: a fresh model outputs exactly zero velocity."""
    m = tiny_sit().eval()
    out, zs = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0 and zs[0].shape == (2, 16, 24)


def test_conv_projector_k1_equals_linear():
    proj = irepa.Projector('conv', 16, 12, kernel=1)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.copy_(proj.projection_layer.weight[:, :, 0, 0])
        lin.bias.copy_(proj.projection_layer.bias)
    x = torch.randn(3, 25, 16)
    torch.testing.assert_close(proj(x), lin(x), rtol=1e-6, atol=1e-6)


def test_conv_projector_is_spatial_and_row_major():
    """A 3x3 conv sees the grid: a token's output changes with its grid neighbour but not with a far token."""
    proj = irepa.Projector('conv', 8, 4, kernel=3)
    x = torch.randn(1, 16, 8)
    base = proj(x)
    x2 = x.clone()
    x2[0, 5] += 1.0  # token (row 1, col 1)
    diff = (proj(x2) - base).abs().sum(-1)[0]  # (16,)
    changed = {i for i in range(16) if diff[i] > 0}
    assert changed == {r * 4 + c for r in range(3) for c in range(3)}  # its 3x3 neighbourhood, row-major


def test_null_label_is_the_unconditional_branch():
    m = randomize(tiny_sit(class_dropout_prob=1.0))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    m.train()  # dropout probability 1: every label replaced by the null label
    dropped = m(x, t, y)[0]
    m.eval()
    torch.testing.assert_close(dropped, m(x, t, torch.full_like(y, m.num_classes))[0])
    assert not torch.allclose(dropped, m(x, t, y)[0])


def test_sdpa_attention_equals_manual():
    attn = randomize(irepa.Attention(32, 4, qk_norm=True))
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv(x).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v  # (2, 4, 9, 8)
    torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 9, 32)), rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Objective invariants


def test_interpolate_endpoints():
    x, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(irepa.interpolate(x, noise, torch.zeros(3)), x)
    torch.testing.assert_close(irepa.interpolate(x, noise, torch.ones(3)), noise)
    mid = irepa.interpolate(x, noise, torch.full((3,), 0.25))
    torch.testing.assert_close(mid, 0.75 * x + 0.25 * noise)


def test_alignment_loss_extremes():
    y = [torch.randn(2, 16, 8), torch.randn(2, 16, 5)]
    scale = [torch.rand(2, 16, 1) + 0.1, torch.rand(2, 16, 1) + 0.1]  # positive, different for every token
    pos = [s * t for s, t in zip(scale, y)]
    assert abs(irepa.alignment_loss(pos, y).item() + 1) < 1e-6
    assert abs(irepa.alignment_loss([-p for p in pos], y).item() - 1) < 1e-6
    mixed = irepa.alignment_loss([pos[0], -pos[1]], y).item()  # mean over teachers
    assert abs(mixed) < 1e-6


def test_flow_loss_zero_for_oracle():
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)

    class Oracle(nn.Module):  # knows the data, so it can return eps - x = (x_t - x) / t
        def forward(self, x_t, t, y, align=True):
            return (x_t - x) / t.view(-1, 1, 1, 1), []
    torch.manual_seed(0)
    flow, align = irepa.flow_loss(Oracle(), x, torch.zeros(4, dtype=torch.long), [])
    assert flow.item() < 1e-20 and align.item() == 0
    torch.manual_seed(0)
    flow, _ = irepa.flow_loss(lambda x_t, t, y, align: (torch.zeros_like(x_t), []), x, None, [])
    assert flow.item() > 0.5  # the zero predictor pays |eps - x|^2


def test_spatial_norm():
    f = torch.randn(3, 16, 8) * 5 + 2
    z = irepa.spatial_norm(f, gamma=1.0)
    torch.testing.assert_close(z.mean(1), torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(3, 8), atol=1e-5, rtol=0)
    z6 = irepa.spatial_norm(f, gamma=0.6)  # gamma < 1 keeps 40% of the mean
    torch.testing.assert_close(z6.mean(1), 0.4 * f.mean(1) / (f.std(1) + 1e-6), atol=1e-5, rtol=1e-5)
    assert irepa.teacher_targets([f], 'none')[0] is f
    with pytest.raises(ValueError, match='zscore'):
        irepa.teacher_targets([f], 'l2')


def test_recipes():
    assert irepa.RECIPES['repa'] == dict(projector='mlp', spnorm='none', proj_coeff=0.5)
    assert irepa.RECIPES['irepa'] == dict(projector='conv', spnorm='zscore', proj_coeff=1.0)


# -----------------------------------------------------------------------------
# Sampler invariants


def test_guidance_outside_interval_is_no_guidance():
    m = randomize(tiny_sit()).eval()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for mode in ('euler', 'heun', 'sde'):
        plain = irepa.sample(m, z, y, mode, 4, generator=torch.Generator().manual_seed(0))
        never = irepa.sample(m, z, y, mode, 4, cfg_scale=3.0, guidance_low=2.0, guidance_high=3.0,
                             generator=torch.Generator().manual_seed(0))
        always = irepa.sample(m, z, y, mode, 4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(plain, never, rtol=0, atol=0)
        assert (always - plain).abs().max() > 1e-3, mode


def test_guidance_on_all_channels():
    """One Euler step from t=1 to 0: x1 = x0 - (v_u + s (v_c - v_u)) on every channel."""
    m = randomize(tiny_sit()).eval()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = torch.ones(2)
    with torch.no_grad():
        v_c, v_u = m(z, t, y)[0], m(z, t, torch.full_like(y, m.num_classes))[0]
    out = irepa.sample(m, z, y, 'euler', 1, cfg_scale=2.5)
    torch.testing.assert_close(out, z - (v_u + 2.5 * (v_c - v_u)), rtol=1e-5, atol=1e-5)


def test_sde_is_seeded_and_deterministic_last_step():
    m = randomize(tiny_sit()).eval()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    a = irepa.sample(m, z, y, 'sde', 5, generator=torch.Generator().manual_seed(1))
    b = irepa.sample(m, z, y, 'sde', 5, generator=torch.Generator().manual_seed(1))
    c = irepa.sample(m, z, y, 'sde', 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == z.dtype and a.shape == z.shape


def test_one_step_euler_exact_for_point_mass():
    """With the exact velocity of point-mass data, (z - x0) / t, one Euler step from noise lands on x0."""
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)

    class PointMass(nn.Module):
        num_classes = 10

        def forward(self, x, t, y, align=True):
            return (x - x0) / t.view(-1, 1, 1, 1), []
    out = irepa.sample(PointMass().eval(), torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                       'euler', 1)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1))


# -----------------------------------------------------------------------------
# Spatial metric invariants


def smooth_tokens(B=4, H=16, D=32, seed=0):
    """Spatially smooth features: a random field blurred on the grid, so near tokens are similar."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, H, H, generator=g)
    f = nn.functional.avg_pool2d(f, 5, 1, 2, count_include_pad=False)
    return f.permute(0, 2, 3, 1).reshape(B, H * H, D)  # (B, T, D)


def test_metrics_known_answers():
    noise = torch.randn(8, 256, 64)
    m = irepa.spatial_metrics(noise)
    assert m['lds'].abs().max() < 0.02 and m['cds'].abs().max() < 0.01  # white noise has no spatial structure
    smooth = smooth_tokens()
    shuffled = smooth[:, torch.randperm(256)]
    ms, mx = irepa.spatial_metrics(smooth), irepa.spatial_metrics(shuffled)
    assert (ms['lds'] > mx['lds'] + 0.3).all() and (ms['cds'] > mx['cds'] + 0.03).all()
    torch.testing.assert_close(ms['rmsc'], mx['rmsc'])  # RMSC ignores positions
    for r in (m['rmsc'], ms['rmsc']):
        assert ((r >= 0) & (r <= 1)).all()
    const = irepa.spatial_metrics(torch.ones(2, 16, 4))
    assert torch.allclose(const['rmsc'], torch.zeros(2), atol=1e-6) and torch.allclose(const['lds'], torch.zeros(2))
    assert m['srss'].isnan().all()  # no masks, no SRSS


def test_srss_masks():
    f = smooth_tokens(B=3)
    masks = torch.zeros(3, 256, dtype=torch.long)
    masks[0, :128] = 1  # top half foreground
    masks[1, :] = 1  # no background -> NaN
    masks[2, 0] = 1  # one foreground token -> NaN
    srss = irepa.spatial_metrics(f, masks)['srss']
    assert srss[0] > 0 and srss[1:].isnan().all()
    v = torch.randn(32)
    two_regions = torch.cat([v.expand(128, 32), -v.expand(128, 32)])[None]  # foreground v, background -v
    assert abs(irepa.spatial_metrics(two_regions, masks[:1])['srss'][0].item() - 2.0) < 1e-5  # 1 - (-1)
    assert srss[0] < 2.0


# -----------------------------------------------------------------------------
# Bad input


def test_bad_model_input():
    with pytest.raises(ValueError, match='SiT-XL/2'):
        irepa.build_sit('SiT-H/2')
    with pytest.raises(ValueError, match='1..3'):
        tiny_sit(encoder_depth=4)
    with pytest.raises(ValueError, match='1..3'):
        tiny_sit(encoder_depth=0)
    with pytest.raises(ValueError, match='square'):
        irepa.Projector('conv', 8, 4)(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match='odd'):
        irepa.Projector('conv', 8, 4, kernel=2)
    with pytest.raises(ValueError, match="'mlp'"):
        irepa.Projector('attn', 8, 4)
    with pytest.raises(ValueError, match='8x8'):
        tiny_sit()(torch.randn(1, 4, 8, 6), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match='square'):
        irepa.spatial_metrics(torch.randn(2, 15, 4))
    with pytest.raises(ValueError, match=r'\(B, T\)'):
        irepa.spatial_metrics(torch.randn(2, 16, 4), torch.ones(2, 15))
    with pytest.raises(ValueError, match='eval mode'):
        irepa.sample(tiny_sit().train(), torch.randn(1, 4, 8, 8), torch.tensor([0]), 'euler', 2)
    with pytest.raises(ValueError, match='heun'):
        irepa.sample(tiny_sit().eval(), torch.randn(1, 4, 8, 8), torch.tensor([0]), 'dpm', 2)


def test_state_dict_from_another_config():
    src = tiny_sit(hidden_size=64).state_dict()
    with pytest.raises(ValueError, match=r'(?s)another model config.*blocks\.0\.attn\.qkv\.weight'):
        irepa.load_state(tiny_sit(), src)
    with pytest.raises(ValueError, match='missing from the checkpoint'):
        irepa.load_state(tiny_sit(depth=4), tiny_sit().state_dict())
    with pytest.raises(ValueError, match='not in the model'):
        irepa.load_state(tiny_sit(), tiny_sit(projector='mlp').state_dict())
    m = tiny_sit()
    irepa.load_state(m, randomize(tiny_sit()).state_dict())  # same config loads
