"""
FID / sFID / Inception Score / Precision / Recall exactly as the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py) computes them, in PyTorch, without TensorFlow.

Evaluate an ADM-format sample file (arr_0: N x H x W x 3 uint8) against a reference batch, e.g. ADM's
VIRTUAL_imagenet256_labeled.npz:
    python fid.py eval VIRTUAL_imagenet256_labeled.npz samples.npz
    python fid.py eval REF.npz SAMPLES.npz --inception pt_inception-2015-12-05-6726825d.pth --device cuda
It prints ADM's five lines: Inception Score, FID, sFID, Precision, Recall. `fid.py sample` draws a checkpoint's images
(irepa.draw_shard, which the FID while training uses too); `fid.py sweep` scores guidance settings on the same seeds:
    python fid.py sweep REF.npz --ckpt CKPT --cfg 1,1.5,2 --interval 0,1 0,0.7      # 10K images each; best marked

The network (encoders.FIDInception) is the 2015-12-05 TF Inception graph ported to PyTorch (pytorch-fid's weights file);
FID and IS are irepa.frechet_distance and irepa.inception_score. What makes the numbers
match the TF evaluator: TF1-legacy bilinear resize to 299 and (x - 128) / 128;
pool_3 for FID and P/R; Mixed_6d.branch1x1 (TF 'mixed_6/conv'), first 7 channels, flattened (h, w, c) for sFID;
bias-free logits over 1008 classes in consecutive splits of 5000 for IS; k=3 manifolds on fp16 squared distances for
P/R; stored mu/sigma/mu_s/sigma_s honoured; float64 statistics; TF32 off.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributed as dist
from PIL import Image
from tqdm.auto import tqdm

import encoders
from encoders import (INCEPTION_FILE, INCEPTION_URL, FIDInception, find_inception, load_inception,  # the network
                      random_inception, resize_tf1, spatial_features)
import irepa
from irepa import ArgumentParser, UserError, cli  # a mistake of the user: one line on stderr, exit code 2
from irepa import compute_stats, frechet_distance, inception_score  # the metrics the training's evaluation shares

CACHE_VERSION = 1  # bump when the cached reference features change meaning

# -----------------------------------------------------------------------------
# ADM-format .npz files: arr_0 is streamed from the zip member, so a 10 GB sample file never sits in memory


@contextlib.contextmanager
def _open_arr0(path):
    """Yield (stream positioned at arr_0's data, shape), after checking arr_0 is an N x H x W x 3 uint8 array."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f'{path}: not an .npz file ({e})') from None
    with zf:
        if 'arr_0.npy' not in zf.namelist():
            keys = [n[:-4] for n in zf.namelist()]
            raise UserError(f'{path}: no arr_0 in the npz (keys: {keys}); ADM files keep the images in arr_0')
        with zf.open('arr_0.npy') as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise UserError(f'{path}: arr_0 has .npy format version {version}; expected 1.0 or 2.0')
            fmt = np.lib.format
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran or shape[0] == 0:
                raise UserError(f'{path}: arr_0 must be a non-empty N x H x W x 3 uint8 array in C order (ADM), '
                                f'got shape {shape}, dtype {dtype}{", Fortran order" if fortran else ""}')
            yield f, shape


def npz_shape(path):
    """Shape (N, H, W, 3) of arr_0, validated, without reading the images."""
    with _open_arr0(path) as (_, shape):
        return shape


def read_npz_batches(path, batch_size=64):
    """Yield arr_0 in consecutive (B, H, W, 3) uint8 batches (the last may be smaller), streaming the zip member."""
    with _open_arr0(path) as (f, shape):
        n, image_bytes = shape[0], int(np.prod(shape[1:]))
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            buf = bytearray(f.read(b * image_bytes))  # a writable copy, so torch.from_numpy is happy
            if len(buf) != b * image_bytes:
                raise UserError(f'{path}: arr_0 is truncated ({i + len(buf) // image_bytes} of {n} images)')
            yield np.frombuffer(buf, np.uint8).reshape(b, *shape[1:])  # (B, H, W, 3)


def read_stored_stats(path):
    """(mu, sigma, mu_s, sigma_s) stored in the npz as ADM's reference batches carry them, or None. ADM uses stored
    statistics instead of the file's own activations for FID and sFID, in the sample file too."""
    with np.load(path, allow_pickle=False) as f:
        if 'mu' not in f.files:
            return None
        missing = [k for k in ('sigma', 'mu_s', 'sigma_s') if k not in f.files]
        if missing:
            raise UserError(f'{path}: has stored mu but not {missing}; ADM needs mu, sigma, mu_s and sigma_s')
        stats = tuple(f[k].astype(np.float64) for k in ('mu', 'sigma', 'mu_s', 'sigma_s'))
    for (mu, sigma), d, what in zip((stats[:2], stats[2:]), (2048, 2023), ('mu/sigma', 'mu_s/sigma_s')):
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise UserError(f'{path}: stored {what} have shapes {mu.shape}/{sigma.shape}, expected ({d},)/({d}, {d})')
    return stats

# -----------------------------------------------------------------------------
# Metrics, on features. They follow evaluator.py line by line where the numbers depend on it.


def _fp16(x):
    return x.half().float()  # round to the nearest fp16 (inf past 65504), keep computing in fp32


def sq_distances(u, v, adm16=True):
    """Squared L2 distances (len(u), len(v)) as ADM's DistanceBlock: ||u||^2 - 2 u.v + ||v||^2 clamped at 0, computed
    on fp16 copies of the features (adm16) with fp16 rounding after each step, or in fp32 if anything overflows.
    TF sums the fp16 squares in half precision on the GPU, which is not reproducible bit for bit; summing the fp16
    squares in fp32 and rounding once keeps the ties that fp16 creates, which move P and R by ~0.002."""
    if adm16:
        u16, v16 = _fp16(u), _fp16(v)
        nu, nv = _fp16((_fp16(u16 * u16)).sum(1)), _fp16((_fp16(v16 * v16)).sum(1))  # (U,), (V,)
        d = _fp16(_fp16(nu[:, None] - 2 * _fp16(u16 @ v16.T)) + nv[None, :])  # (U, V)
        if torch.isfinite(d).all():
            return d.clamp_min(0)
    d = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]  # (U, V)
    return d.clamp_min(0)


def manifold_radii(x, k=3, block_size=10000, adm16=True):
    """Squared distance from each row of x to its k-th nearest neighbour in x, the point itself counted as the 0-th."""
    radii = []
    for i in range(0, len(x), block_size):
        d = torch.cat([sq_distances(x[i:i + block_size], x[j:j + block_size], adm16)
                       for j in range(0, len(x), block_size)], 1)  # (block, N): ADM holds the same 10k x N block
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_feats, sample_feats, k=3, block_size=10000, adm16=True, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM: precision = fraction of samples inside some
    reference k-NN ball, recall = fraction of references inside some sample k-NN ball; squared distances, radius
    included (<=), sample radii from all samples. Distances are computed in blocks, never N x N at once."""
    ref = torch.as_tensor(ref_feats, dtype=torch.float32, device=device)
    sample = torch.as_tensor(sample_feats, dtype=torch.float32, device=device)
    if len(ref) <= k or len(sample) <= k:
        raise UserError(f'precision/recall with k={k} needs at least {k + 1} reference and {k + 1} sample images; '
                        f'got {len(ref)} and {len(sample)}')
    ref_radii, sample_radii = manifold_radii(ref, k, block_size, adm16), manifold_radii(sample, k, block_size, adm16)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block_size):
        for j in range(0, len(sample), block_size):
            d = sq_distances(ref[i:i + block_size], sample[j:j + block_size], adm16)  # (R, S): ADM's argument order
            ref_in[i:i + block_size] |= (d <= sample_radii[None, j:j + block_size]).any(1)
            sample_in[j:j + block_size] |= (d <= ref_radii[i:i + block_size, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()

# Features and statistics


@contextlib.contextmanager
def exact_fp32():
    """TF32 off and deterministic cuDNN while evaluating: with TF32 the features depend on the batch size and the GPU
    (torchmetrics #1620, torch-fidelity #43). The previous settings are restored afterwards."""
    b = torch.backends
    saved, tf32 = (b.cudnn.benchmark, b.cudnn.deterministic), irepa.tf32(False)
    b.cudnn.benchmark, b.cudnn.deterministic = False, True
    try:
        yield
    finally:
        b.cudnn.benchmark, b.cudnn.deterministic = saved
        irepa.tf32(tf32)


@torch.no_grad()
def extract_features(path, net, batch_size=64, device='cpu'):
    """pool3 (N, 2048), spatial (N, 2023) and logits (N, 1008) of arr_0, as float32 numpy arrays."""
    device = torch.device(device)
    n = npz_shape(path)[0]
    outs = []
    for batch in tqdm(read_npz_batches(path, batch_size), total=-(-n // batch_size), desc=os.path.basename(path),
                      unit='batch', file=sys.stderr):
        x = torch.from_numpy(batch)
        if device.type == 'cuda':
            x = x.pin_memory()  # async copy: the next batch is read from disk while the GPU works
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        outs.append(net(x))  # features stay on the device until the end: no sync per batch
    return tuple(torch.cat(o).cpu().numpy() for o in zip(*outs))


def reference_features(path, net, batch_size=64, device='cpu', cache_dir=None):
    """pool3 features and computed statistics of the reference batch, cached by file (path, size, mtime) and weights
    hash; a module without `weights_sha256` (not from load_inception) is never cached."""
    cache = None
    if cache_dir and getattr(net, 'weights_sha256', None):
        st = os.stat(path)
        key = f'v{CACHE_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{net.weights_sha256}'
        cache = os.path.join(os.path.expanduser(cache_dir), hashlib.sha256(key.encode()).hexdigest()[:32] + '.npz')
        if os.path.exists(cache):
            print(f'{path}: reference features from the cache {cache}', file=sys.stderr)
            with np.load(cache) as f:
                return {k: f[k] for k in f.files}
    pool, spatial, _ = extract_features(path, net, batch_size, device)
    (mu, sigma), (mu_s, sigma_s) = compute_stats(pool, device), compute_stats(spatial, device)
    ref = dict(pool=pool, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    if cache:
        irepa.atomic_write(cache, lambda f: np.savez(f, **ref))  # no run ever sees half a file
    return ref

# -----------------------------------------------------------------------------
# The evaluation


def evaluate(ref_path, sample_path, inception=None, any_weights=False, batch_size=64, device='cpu', cache_dir=None,
             is_split=5000, k=3, pr_block=10000, pr_dtype='adm16', fd_method='eigh'):
    """ADM's evaluator: dict with 'IS', 'FID', 'sFID', 'precision', 'recall' of the samples against the reference.
    `inception` is a module from load_inception or a weights path (None: the usual search)."""
    if pr_dtype not in ('adm16', 'fp32'):
        raise ValueError(f"pr_dtype must be 'adm16' (as ADM) or 'fp32', got {pr_dtype!r}")
    n_ref, n_sample = npz_shape(ref_path)[0], npz_shape(sample_path)[0]  # bad files fail before minutes of Inception
    if n_sample < is_split:
        raise UserError(f'{sample_path}: {n_sample} images, fewer than one Inception Score split of {is_split} '
                        '(ADM: 5000; a smaller --is-split is for smoke tests only)')
    if min(n_ref, n_sample) <= k:
        raise UserError(f'precision/recall with k={k} needs at least {k + 1} images per file; got {n_ref} reference '
                        f'and {n_sample} sample images')
    ref_stored, sample_stored = read_stored_stats(ref_path), read_stored_stats(sample_path)
    net = inception if isinstance(inception, nn.Module) else load_inception(inception, any_weights, device)
    net = net.to(device).eval()
    with exact_fp32():
        ref = reference_features(ref_path, net, batch_size, device, cache_dir)
        pool, spatial, logits = extract_features(sample_path, net, batch_size, device)
        ref_stats = ref_stored or (ref['mu'], ref['sigma'], ref['mu_s'], ref['sigma_s'])
        sample_stats = sample_stored or (*compute_stats(pool, device), *compute_stats(spatial, device))
        precision, recall = precision_recall(ref['pool'], pool, k, pr_block, pr_dtype == 'adm16', device)
    return {  # ADM computes sample.frechet_distance(ref): the sample statistics first
        'IS': inception_score(logits, is_split),
        'FID': frechet_distance(*sample_stats[:2], *ref_stats[:2], method=fd_method),
        'sFID': frechet_distance(*sample_stats[2:], *ref_stats[2:], method=fd_method),
        'precision': precision,
        'recall': recall,
    }

# -----------------------------------------------------------------------------
# Sampling: a checkpoint -> exactly N images in one ADM-format .npz, sharded over ranks, resumable
# Shard k holds images [k*B, (k+1)*B) and is seeded with (seed, k) alone, so the result does not depend on the number
# of processes, and a killed run redoes only the shards that are missing.


def write_npz(path, shard_files, shape):
    """Stream the shards into `path` as arr_0 (N, H, W, 3) uint8, never holding all images in memory."""
    def write(file):
        with zipfile.ZipFile(file, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, dict(descr='|u1', fortran_order=False, shape=tuple(shape)))
                for s in shard_files:
                    f.write(np.ascontiguousarray(np.load(s)).tobytes())
    irepa.atomic_write(path, write)


def model_from_checkpoint(path, ema=True, device='cpu'):
    """The SiT or JiT of a checkpoint (EMA weights by default) in eval mode, and a dict that describes it. Reads
    checkpoints of irepa.py and of the official iREPA/REPA code (ldm/ and jit/). Theirs pickle an argparse Namespace,
    which is allowed through the weights_only load; they do not store the latent normalization, so info['latent'] is
    None (a JiT needs none: pixel space)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    official_jit = isinstance(ckpt, dict) and 'model_ema1' in ckpt and 'args' in ckpt
    if not official_jit and (not isinstance(ckpt, dict) or 'ema' not in ckpt or
                             not ('model_args' in ckpt or 'args' in ckpt)):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a SiT or JiT checkpoint of irepa.py or the official code (it holds {keys})")
    if official_jit:  # the Denoiser's state dicts ('net.' keys); the first EMA (decay 0.9999) samples, as theirs
        return official_jit_model(path, ckpt, ema, device)
    state = ckpt['ema' if ema else 'model']
    if 'model_args' in ckpt:  # ours
        args, info = ckpt['model_args'], dict(config=ckpt['config'], latent=ckpt.get('latent'), step=ckpt['step'],
                                              vae_state=ckpt.get('vae'))  # REPA-E: the VAE trained with the SiT
        model = (irepa.JiT if ckpt['config']['model'].startswith('JiT-') else irepa.SiT)(**args)
    else:  # official: rebuild from its training arguments; the projectors are not needed to sample
        a = vars(ckpt['args'])
        args = irepa.sit_args(a['model'], input_size=a['resolution'] // 8, num_classes=a.get('num_classes', 1000),
                              encoder_depth=a.get('encoder_depth'), qk_norm=a.get('qk_norm', False), z_dims=())
        state = {k: v for k, v in state.items() if not k.startswith('projectors.')}
        info = dict(config=a, latent=None, step=ckpt.get('steps'))
        model = irepa.SiT(**args)
    irepa.load_state(model, state)
    return model.to(device).eval(), info


def official_jit_model(path, ckpt, ema, device):
    """An official JiT checkpoint (jit/main_jit.py): its args name the model; the weights must be of that size."""
    a = vars(ckpt['args'])
    state = {k[4:]: v for k, v in ckpt['model_ema1' if ema else 'model'].items()
             if k.startswith('net.') and not k.startswith('net.projectors.')}
    depth = 1 + max((int(k.split('.')[1]) for k in state if k.startswith('blocks.')), default=-1)
    width, patch = state['pos_embed'].shape[-1], state['x_embedder.proj1.weight'].shape[-1]
    size = next((f"JiT-{s}/{patch}" for s, v in irepa.JIT_SIZES.items() if v[:2] == (depth, width)), None)
    if size != a['model']:
        raise UserError(f"{path}: its args name {a['model']}, but its weights are of "
                        f"{size or f'a JiT of depth {depth}, width {width}, patch {patch}'}")
    args = irepa.jit_args(a['model'], input_size=a['img_size'], num_classes=a.get('class_num', 1000), z_dims=())
    model = irepa.JiT(**args)
    irepa.load_state(model, state, f'official JiT checkpoint {path}')
    info = dict(config=dict(a, vae='none'), latent=None, step=ckpt.get('epoch'))
    return model.to(device).eval(), info


def latent_decoder(a, model, info, device):
    """(norm, vae) that turn the SiT's latents into images: the checkpoint's, or for an official checkpoint those that
    --latent-stats or --latent-scale and --vae name; (None, None) for a pixel-space model."""
    norm = irepa.LatentNorm.from_dict(info['latent'], device)  # its constants on the device once: no copy per shard
    if a.latent_stats or a.latent_scale:  # official checkpoints: the normalization their training used
        if a.latent_stats:  # iREPA's stats file: z = (latent - bias) * scale, decoded as z / scale + bias
            st = torch.load(a.latent_stats, map_location='cpu', weights_only=True)
            scale, bias = st['latents_scale'].float().flatten(), st['latents_bias'].float().flatten()
        else:  # REPA: z = latent * 0.18215, decoded as z / 0.18215
            scale, bias = torch.full((model.in_channels,), a.latent_scale), torch.zeros(model.in_channels)
        norm = irepa.LatentNorm(a.vae or 'sd-vae-ft-mse', bias, 1 / scale, scale=scale, device=device)
    elif norm is None and info['config'].get('vae') != 'none':  # official configs have no 'vae'
        raise UserError(f"{a.ckpt} does not store its latent normalization (an official checkpoint?): pass "
                        "--latent-stats sdvae-ft-mse-f8d4-latents-stats.pt (iREPA) or --latent-scale 0.18215 (REPA)")
    if norm is None:
        return None, None
    if norm.vae == 'checkpoint' and not a.vae:  # REPA-E: the VAE trained with the SiT
        vae = encoders.AutoencoderKL(**norm.vae_args)
        vae.load_state_dict(info['vae_state'])
    else:
        vae = encoders.load_vae(a.vae or norm.vae, device=device)
    return norm, vae.to(device).eval().requires_grad_(False)


def shard_folder(a, norm, stem):
    """STEM.shards/, holding the settings its shards are drawn with: a run goes on only from shards of its own."""
    rank, world, _ = irepa.dist_info()
    barrier = (lambda: dist.barrier(group=irepa.cpu_group())) if world > 1 else lambda: None  # a wait off the GPU
    shards, guidance = Path(stem + '.shards'), [a.guidance_low, a.guidance_high]
    settings = dict(ckpt=os.path.abspath(a.ckpt), num_samples=a.num_samples, batch_size=a.batch_size, seed=a.seed,
                    mode=a.mode, num_steps=a.num_steps, cfg_scale=a.cfg_scale, guidance=guidance,
                    class_balanced=a.class_balanced, precision=a.precision, latent=norm and norm.to_dict())
    meta = shards / 'settings.json'
    if meta.exists() and json.loads(meta.read_text()) != json.loads(json.dumps(settings)):
        raise UserError(f"{shards} holds shards made with other settings ({meta}); delete it or pick another --out")
    barrier()  # every rank has checked before rank 0 writes
    if rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        irepa.atomic_text(meta, json.dumps(settings, indent=1))
    barrier()
    return shards


def assemble(out, stem, shards, n_shards, num_samples):
    """The finished shards -> OUT (ADM's .npz) and STEM.png (the first 64 images); then the shards go."""
    files = [shards / f'{k:06d}.npy' for k in range(n_shards)]
    first = np.load(files[0])
    write_npz(out, files, (num_samples, *first.shape[1:]))
    irepa.save_grid(torch.from_numpy(first[:64]), stem + '.png')
    for f in files + [shards / 'settings.json']:
        f.unlink()
    shards.rmdir()
    print(f"wrote {num_samples} images {tuple(first.shape[1:])} to {out} (preview: {stem}.png)", file=sys.stderr)


def sample_main(a):
    """`fid.py sample`: a.num_samples images of the checkpoint's EMA model into a.out, in shards over the ranks. A stop
    signal ends the run between shards (sharded_pass: exit PREEMPTED) and the same command goes on from there."""
    ddp, device = int(os.environ.get('WORLD_SIZE', 1)) > 1, a.device  # a torch.device with its index (main)
    irepa.use_device(device)  # before the process group; TF32 on, as the official generate.py
    if ddp:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        rank, world, _ = irepa.dist_info()
        model, info = model_from_checkpoint(a.ckpt, device=device)
        norm, vae = latent_decoder(a, model, info, device)
        out = os.path.abspath(a.out)
        stem = out[:-4] if out.endswith('.npz') else out
        shards, n_shards = shard_folder(a, norm, stem), -(-a.num_samples // a.batch_size)
        if rank == 0:
            missing = sum(not (shards / f'{k:06d}.npy').exists() for k in range(n_shards))
            print(f"sampling {a.num_samples} images: {missing} of {n_shards} shards of {a.batch_size} to do, "
                  f"{a.mode} {a.num_steps} steps, cfg {a.cfg_scale} on [{a.guidance_low}, {a.guidance_high}], "
                  f"{world} process(es)", file=sys.stderr)
        bf16 = a.precision == 'bf16'
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        net = torch.compile(model, dynamic=False) if a.compile else model  # two graphs: the batch and its CFG double
        work = lambda k: irepa.draw_shard(a, k, model, vae, norm, device, autocast, net)  # images k * batch_size ...
        irepa.sharded_pass(shards, n_shards, work, '.npy', lambda x, f: np.save(f, x), 'sample',
                           f'shards to do in {shards}')
        if rank == 0:
            assemble(out, stem, shards, n_shards, a.num_samples)
    finally:
        if ddp:
            dist.destroy_process_group()

# -----------------------------------------------------------------------------
# Command line


def eval_flags(p, alone=True):
    """The flags of `eval` (alone: also those `sweep` takes from sample_flags, the batch size and the device)."""
    p.add_argument('--inception', default=None, help=f"path to {INCEPTION_FILE} (else $IREPA_INCEPTION, else the "
                   "torch hub cache); 'random' for smoke runs")
    p.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    p.add_argument('--any-weights', action='store_true', help='accept other weights (numbers not comparable)')
    if alone:
        p.add_argument('--batch-size', type=int, default=64, help='images per Inception batch (ADM: 64)')
        p.add_argument('--device', default='auto', help="'auto' (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--cache-dir', default='~/.cache/irepa/fid', help='where reference features are cached')
    p.add_argument('--no-cache', action='store_true', help='neither read nor write the reference cache')
    p.add_argument('--is-split', type=int, default=5000, help='Inception Score split size (ADM: 5000)')
    p.add_argument('--pr-dtype', default='adm16', choices=['adm16', 'fp32'], help='P/R distances: fp16 as ADM or fp32')
    p.add_argument('--pr-block', type=int, default=10000, help='rows/columns per P/R distance block')
    p.add_argument('--fd-method', default='eigh', choices=['eigh', 'sqrtm'],
                   help="trace of sqrt(S1 S2): symmetric eigendecompositions (fast, exact) or ADM's scipy sqrtm")


def sample_flags(p, num_samples=50_000):
    """The flags of `sample` that `sweep` shares: the checkpoint, the count, the sampler, the seeds, the hardware."""
    p.add_argument('--ckpt', required=True, help='checkpoint of irepa.py (or of the official iREPA/REPA/JiT code)')
    p.add_argument('--num-samples', type=int, default=num_samples)
    p.add_argument('--mode', choices=['sde', 'euler', 'heun', 'meanflow'], default='sde',
                   help="the paper's: SDE, 250 steps; MeanFlow models: meanflow, 1 (or 2, 4) steps; JiT models: "
                   "heun (or euler), 50 steps, as the official JiT")
    p.add_argument('--num-steps', type=int, default=250)
    p.add_argument('--batch-size', type=int, default=64, help='images per shard and per forward, per process')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--class-balanced', action='store_true', help='labels i %% num_classes instead of random ones')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32', help='bf16 autocast for the SiT (the '
                   "paper's numbers are fp32; compare the two with fid.py eval before switching)")
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile the SiT '
                   '(default: on CUDA); the last shard, if smaller, compiles once more')
    p.add_argument('--vae', default=None, help='override the VAE stored in the checkpoint (name or local file)')
    p.add_argument('--latent-stats', default=None, help="official checkpoints: latents-stats .pt (latents_scale/bias)")
    p.add_argument('--latent-scale', type=float, default=None, help='official REPA checkpoints: 0.18215')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'")


def floats(text, n=None):
    """'1,1.5,2' -> [1.0, 1.5, 2.0] (argparse type); n: exactly that many."""
    try:
        v = [float(x) for x in text.split(',')]
    except ValueError:
        v = []
    if not v or (n and len(v) != n):
        raise argparse.ArgumentTypeError(f"expected {n or 'some'} comma-separated numbers, got {text!r}")
    return v


def get_parser():
    parser = ArgumentParser(prog='fid.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='cmd', required=True)
    ev = sub.add_parser('eval', help='IS, FID, sFID, precision, recall of SAMPLES against REF, as the ADM evaluator')
    ev.add_argument('ref', help='reference batch .npz (arr_0, optionally stored mu/sigma/mu_s/sigma_s)')
    ev.add_argument('samples', help='sample batch .npz (arr_0: N x H x W x 3 uint8)')
    eval_flags(ev)
    sa = sub.add_parser('sample', help='a checkpoint -> N images in one ADM-format .npz (torchrun for several GPUs)')
    sample_flags(sa)
    sa.add_argument('--out', default=None, help='output .npz (default: next to the checkpoint, named by the settings)')
    sa.add_argument('--cfg-scale', type=float, default=1.0)
    sa.add_argument('--guidance-low', type=float, default=0.0)
    sa.add_argument('--guidance-high', type=float, default=1.0)
    sw = sub.add_parser('sweep', help='FID of one checkpoint at each guidance setting, on the same seeds: the best')
    sw.add_argument('ref', help='reference batch .npz, as for eval')
    sample_flags(sw, num_samples=10_000)
    sw.add_argument('--cfg', type=floats, default=[1.0], help='guidance scales, e.g. 1,1.5,2')
    sw.add_argument('--interval', type=lambda t: floats(t, 2), nargs='+', default=[[0.0, 1.0]],
                    help='guidance intervals LOW,HIGH (t in [LOW, HIGH] is guided), e.g. 0,1 0,0.7')
    eval_flags(sw, alone=False)
    return parser


def check_args(parser, a):
    """The counts positive and the input files present, as one error line before any work."""
    for k in ('num_samples', 'batch_size', 'num_steps', 'is_split', 'pr_block'):
        if getattr(a, k, 1) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(a, k)})")
    if getattr(a, 'latent_stats', None) and not os.path.isfile(a.latent_stats):
        parser.error(f"--latent-stats: no such file: {a.latent_stats}")


def sample_defaults(parser, a):
    """--compile: on CUDA, if the compiler is there; --out: ../samples/ beside the checkpoint, named by the settings."""
    a.compile = a.device.type == 'cuda' if a.compile is None else a.compile
    if a.compile and (missing := irepa.compiler_missing(a.device.type)):
        parser.error(f"--compile: torch.compile's inductor backend needs {missing}; install it or pass --no-compile")
    if a.out is None:
        stem = os.path.splitext(os.path.basename(a.ckpt))[0]
        a.out = os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), '..', 'samples', (
            f'{stem}-{a.mode}{a.num_steps}-cfg{a.cfg_scale}-{a.guidance_low}-{a.guidance_high}'
            f'-seed{a.seed}-n{a.num_samples}.npz'))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)


def eval_main(a):
    """`fid.py eval`: ADM's five lines on stdout, and with --json the numbers in a file."""
    irepa.use_device(a.device)
    r = evaluate(a.ref, a.samples, a.inception, a.any_weights, a.batch_size, a.device,
                 None if a.no_cache else a.cache_dir, a.is_split, pr_block=a.pr_block, pr_dtype=a.pr_dtype,
                 fd_method=a.fd_method)
    print('Inception Score:', r['IS'])
    print('FID:', r['FID'])
    print('sFID:', r['sFID'])
    print('Precision:', r['precision'])
    print('Recall:', r['recall'])
    if a.json:
        # complete or absent: run.sh skips an evaluation whose file exists
        irepa.atomic_text(a.json, json.dumps(dict(r, ref=a.ref, samples=a.samples), indent=1))


def sweep_main(parser, a):
    """`fid.py sweep`: at each guidance scale and interval, the same seeds' images (`sample`: sharded, resumable) and
    their five numbers against REF (`eval`, rank 0); a table with the lowest FID marked, and its rows as JSON (--json,
    default beside the samples). 10K images rank the settings; confirm the best with 50K (sample + eval)."""
    rows = []
    for cfg_scale in a.cfg:
        for low, high in a.interval:
            s = argparse.Namespace(**vars(a) | dict(cfg_scale=cfg_scale, guidance_low=low, guidance_high=high,
                                                    out=None))
            sample_defaults(parser, s)  # the samples' file, named by the settings: a rerun skips what is done
            if not os.path.exists(s.out):
                sample_main(s)
            rows.append(dict(cfg_scale=cfg_scale, guidance_low=low, guidance_high=high, samples=s.out))
    if not irepa.rank_zero():
        return
    net = load_inception(a.inception, a.any_weights, a.device)
    for r in rows:
        r |= evaluate(a.ref, r['samples'], net, batch_size=a.batch_size, device=a.device, is_split=a.is_split,
                      cache_dir=None if a.no_cache else a.cache_dir, pr_block=a.pr_block, pr_dtype=a.pr_dtype,
                      fd_method=a.fd_method)
    best = min(rows, key=lambda r: r['FID'])
    print(f"{'cfg':>5s} {'interval':>12s} {'FID':>9s} {'sFID':>9s} {'IS':>9s} {'precision':>9s} {'recall':>9s}")
    for r in rows:
        interval = f"[{r['guidance_low']:g}, {r['guidance_high']:g}]"
        print(f"{r['cfg_scale']:5g} {interval:>12s} {r['FID']:9.3f} {r['sFID']:9.3f} {r['IS']:9.3f} "
              f"{r['precision']:9.4f} {r['recall']:9.4f}" + '  <- best' * (r is best))
    stem = os.path.splitext(os.path.basename(a.ckpt))[0]
    out = a.json or os.path.join(os.path.dirname(best['samples']), f'{stem}-sweep-{a.mode}{a.num_steps}-seed{a.seed}'
                                                                     f'-n{a.num_samples}.json')
    irepa.atomic_text(out, json.dumps(dict(ref=a.ref, ckpt=a.ckpt, num_samples=a.num_samples, best=best, rows=rows),
                                      indent=1))
    print(f"best: cfg {best['cfg_scale']:g} on [{best['guidance_low']:g}, {best['guidance_high']:g}], FID "
          f"{best['FID']:.3f} at {a.num_samples} images; confirm it with 50K (fid.py sample + eval). JSON: {out}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.device = irepa.torch_device(args.device)  # 'cuda' -> cuda:LOCAL_RANK; a missing device: one line, exit 2
    if args.cmd == 'sample':
        sample_defaults(parser, args)
        sample_main(args)
    elif args.cmd == 'sweep':
        sweep_main(parser, args)
    else:
        eval_main(args)


if __name__ == '__main__':
    cli(main, 'fid.py')
