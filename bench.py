"""
Speed and memory of irepa's pieces on synthetic tensors already on the device: one JSON line per workload on stdout
(img/s, median ms per step, peak memory, MFU), a header line on stderr. Training never imports this file.

    python bench.py                  # CPU quick run (~20 s, 1 thread): SiT-T/2 at 128 px,
                                     # random 2-block DINOv2-B teacher
    python bench.py --suite memory   # CPU, fake tensors (~1 min): estimated peak memory of a training step,
                                     # per-GPU batch
    python bench.py --suite gpu      # one CUDA device, <= 5 min (--budget): CUDA correctness, throughput; one table
    python bench.py --suite official --official ../iREPA  # CPU, ~10 min: against the official code, each in its own
                                                          # process, alternating rounds (--rounds)

The H200 command set (CUDA defaults: bf16 autocast, torch.compile, which happens in the untimed warm-up):

    python bench.py --device cuda --model SiT-B/2  --batch-size 256 --workloads train
    python bench.py --device cuda --model SiT-B/2  --batch-size 256 --workloads train --teacher none
    python bench.py --device cuda --model SiT-XL/2 --batch-size 256 --workloads train
    python bench.py --device cuda --model SiT-XL/2 --batch-size 256 --workloads train --teacher none  # goal mfu >= 0.40
    python bench.py --device cuda --model SiT-XL/2 --batch-size 256 --workloads sample --sample-steps 50
    python bench.py --device cuda --batch-size 256 --workloads metrics,fid
    python bench.py --device cuda --model SiT-B/2 --batch-size 256 --workloads train,train-naive
                                                    # (fp32 XL/2 at 256 OOMs)

train: irepa.Flow's step (iREPA's row, the unit irepa.train runs) after the frozen teacher + spatial norm (or on random
targets: --teacher none).
train-naive: the same model, data and loss code written the straightforward way (fp32, eager, plain AdamW, .item()
every step, DiT's per-parameter EMA loop); the two take turns step by step, so a busy neighbour slows both alike, and
the train line carries `speedup`. train-official and metrics-official (--official DIR, a checkout of
github.com/End2End-Diffusion/iREPA): the official SiT, SILoss, AdamW, update_ema and spatial metrics on the same shapes;
--suite official runs each in its own process against train / metrics, alternating, and prints the ratios (with
--rounds 0, in one process, taking turns, the lines carry `vs_official`). train-cached: the train step with the
teacher's tokens read by index from a memmap (--teacher-cache) instead of the teacher's forward; its line carries
`vs_online`. fid runs fp32 with TF32 off, as evaluation does. MFU = img/s x 6 (12 L D^2 T +
2 L T^2 D) (+ the teacher forward in mfu_with_teacher) / the dense bf16 peak of irepa.PEAK_BF16_FLOPS; CPUs, unknown
GPUs: null.
"""
import argparse
import contextlib
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import encoders
import fid
import irepa

# -----------------------------------------------------------------------------
# Flags. None means "the device's default" below: a CPU run must stay under a minute, a GPU run must fill the GPU.
p = argparse.ArgumentParser(description='Benchmark the iREPA training step, sampler, spatial metrics and FID features')
p.add_argument('--model', default=None, choices=irepa.MODELS, metavar='NAME', help='CUDA SiT-XL/2, CPU SiT-T/2')
p.add_argument('--batch-size', type=int, default=None, help='CUDA 256, CPU 4')
p.add_argument('--steps', type=int, default=None, help='timed steps, median reported; CUDA 20, CPU 3')
p.add_argument('--warmup', type=int, default=None, help='untimed steps first (compilation happens here); CUDA 3, CPU 1')
p.add_argument('--device', default='auto', help="'auto' (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'")
p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None, help='default on for CUDA')
p.add_argument('--precision', choices=['bf16', 'fp32'], default=None, help='bf16: autocast; CUDA bf16, CPU fp32')
p.add_argument('--grad-ckpt', action='store_true', help="irepa.py's --grad-ckpt: activation checkpointing per block")
p.add_argument('--suite', choices=['workloads', 'memory', 'gpu', 'official'], default='workloads',
               help='workloads: --workloads below; memory: the estimated per-GPU batch table (README); gpu: the GPU '
               'check (needs the test extras); official: step and metrics against --official, at 256 px')
p.add_argument('--workloads', default=None, help='of train,train-naive,train-official,train-cached,sample,metrics,'
               'metrics-official,fid; CUDA: train,sample,metrics,fid; CPU: also train-naive')
p.add_argument('--official', default=None, metavar='DIR', help='a checkout of the official iREPA code, for the '
               '*-official workloads')
p.add_argument('--resolution', type=int, default=None, help='pixels; latents are resolution/8. CUDA 256, CPU 128')
p.add_argument('--teacher', default='dinov2', help="any teacher of encoders.py, random weights; 'none': random targets")
p.add_argument('--teacher-depth', type=int, default=None, help='blocks of the random teacher; CUDA all, CPU 2')
p.add_argument('--sample-steps', type=int, default=None, help='SDE steps; CUDA 50, CPU 10')
p.add_argument('--sample-repeats', type=int, default=None, help='timed sampler runs; CUDA 3, CPU 2')
p.add_argument('--cfg-scale', type=float, default=1.5, help='> 1, so the CFG-doubled batch is exercised')
p.add_argument('--fid-batch-size', type=int, default=None, help='CUDA --batch-size, CPU 2')
p.add_argument('--threads', type=int, default=None, help="CPU threads; CPU 1, CUDA torch's default")
p.add_argument('--metrics-images', type=int, default=None, help='token grids of the metrics workloads; --batch-size')
p.add_argument('--budget', type=float, default=None, help='--suite gpu: seconds it may take; a row whose estimate '
               'would end past it is skipped (CUDA 270: 5 minutes with the start; CPU: none)')
p.add_argument('--rounds', type=int, default=None, help='--suite official: rounds, each code in its own process, '
               'alternating (default 5); 0: the listed workloads in this one process, taking turns call by call')
args = p.parse_args()
if args.suite == 'official':  # SiT-S/2, batch 8, 256 px, random target tokens, 2 threads for both codes; flags win
    for k, v in dict(model='SiT-S/2', batch_size=8, resolution=256, teacher='none', steps=10, warmup=3, threads=2,
                     metrics_images=256, workloads='train-official,train,metrics-official,metrics', rounds=5).items():
        if getattr(args, k) == p.get_default(k):
            setattr(args, k, v)
try:
    device = irepa.torch_device(args.device)  # 'cuda' -> cuda:0, with its index; a missing device: one line, exit 2
except (irepa.UserError, encoders.LoadError) as e:
    sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
cuda = device.type == 'cuda'
# On this project's 2-core CPU a SiT-S/2 step at 256 px and batch 8 takes ~10-20 s, the FID Inception ~0.2-1.4 s per
# image, so the CPU defaults shrink the work; the shapes that matter on a GPU are the CUDA ones. One CPU thread: on a
# shared machine, OpenMP threads beyond the free cores spin at every barrier (measured here: 10-25x slower steps).
DEFAULTS = dict(model='SiT-XL/2', batch_size=256, steps=20, warmup=3, compile=True, precision='bf16', resolution=256,
                teacher_depth=None, sample_steps=50, sample_repeats=3,
                workloads='train,sample,metrics,fid') if cuda else \
    dict(model='SiT-T/2', batch_size=4, steps=3, warmup=1, compile=False, precision='fp32', resolution=128,
         teacher_depth=2, sample_steps=10, sample_repeats=2, workloads='train-naive,train,sample,metrics,fid',
         fid_batch_size=2, threads=1)
for k, v in DEFAULTS.items():
    if getattr(args, k) is None:
        setattr(args, k, v)
args.fid_batch_size = args.fid_batch_size or args.batch_size
if args.threads:
    torch.set_num_threads(args.threads)
ORDER = ['train-naive', 'train-official', 'train', 'train-cached', 'sample', 'metrics-official', 'metrics', 'fid']
workloads = args.workloads.split(',')
if set(workloads) - set(ORDER):  # a mistake of the user: argparse's one line and exit code 2, as the other files
    p.error(f"unknown workloads {sorted(set(workloads) - set(ORDER))}; accepted: {', '.join(ORDER)}")
if any(w.endswith('-official') for w in workloads) and not (args.official and (Path(args.official) / 'ldm').is_dir()):
    p.error(f"the *-official workloads need --official DIR, a checkout of github.com/End2End-Diffusion/iREPA "
            f"(with ldm/ and metrics/); got {args.official}")
if 'train-cached' in workloads and args.teacher == 'none':
    p.error("train-cached compares cached with online teacher tokens: give a --teacher")
if args.teacher != 'none':
    try:
        encoders.resolve_teacher(args.teacher)
    except (irepa.UserError, encoders.LoadError) as e:
        p.error(str(e))

# -----------------------------------------------------------------------------
# Device, clock, memory, peak FLOPs
irepa.use_device(device)  # as irepa.train: the current device, TF32 for fp32 leftovers
name = torch.cuda.get_device_name(device) if cuda else 'cpu'
peak = next((v for k, v in irepa.PEAK_BF16_FLOPS.items() if k in name), None) if cuda else None
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {name} (bf16 peak "
      f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}), {torch.get_num_threads()} threads", file=sys.stderr)


def sync():  # the bench syncs around each timed call to read the clock; the timed code itself never waits
    if cuda:
        torch.cuda.synchronize(device)


def peak_mem():
    return (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def timed(steps, warmup, n):
    """{name: (median seconds, peak memory, median page faults)} of n calls of each step function after `warmup`
    untimed ones (compilation happens there); the functions take turns call by call. Peak memory: the largest over the
    timed calls. Page faults (minor: fresh pages the allocator got from the OS), the process's per call: on a CPU
    a step's first touch of new memory is part of its time."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times, mems, faults = {k: [] for k in steps}, {k: 0 for k in steps}, {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step()
            sync()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            mems[k] = max(mems[k], peak_mem())
    return {k: (statistics.median(times[k]), mems[k], statistics.median(faults[k])) for k in steps}


def autocast(c):
    return torch.autocast(device.type, dtype=torch.bfloat16) if c.precision == 'bf16' else contextlib.nullcontext()


def record(c, workload, seconds, mem, faults, images, flops_per_img=None, **extra):
    """One JSON line for `images` per step; flops_per_img (useful FLOPs) gives the MFU against the bf16 peak."""
    rec = dict(workload=workload, model=c.model, device=name, precision=c.precision, compile=c.compile,
               grad_ckpt=c.grad_ckpt, batch_size=images, resolution=c.resolution,
               img_per_s=round(images / seconds, 3), ms_per_step=round(seconds * 1e3, 2),
               peak_mem_gb=round(mem / 2 ** 30, 3), page_faults=int(faults),
               mem_kind='torch.cuda.max_memory_allocated' if cuda else 'ru_maxrss (process high-water mark)',
               threads=torch.get_num_threads(), pid=os.getpid())
    rec['mfu'] = round(images / seconds * flops_per_img / peak, 4) if peak and flops_per_img else None
    if flops_per_img and not peak:
        rec['peak'] = f"unknown device {name}: not in irepa.PEAK_BF16_FLOPS"
    return {**rec, **extra}


# -----------------------------------------------------------------------------
# Training: the real step and the straightforward one, from the same seed (same teacher, init, data)

@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):  # DiT's, REPA's and the official iREPA's: a Python loop over tensors
    ema_params = OrderedDict(ema_model.named_parameters())
    for n, param in model.named_parameters():
        ema_params[n].mul_(decay).add_(param.data, alpha=1 - decay)


def official_module(c, path):
    """A module of the official code (--official DIR) by its path, e.g. 'ldm/loss.py', with DIR/ldm on sys.path for
    its own imports (models.sit, projection_loss)."""
    import importlib.util
    root = Path(c.official).resolve()
    sys.path.insert(0, str(root / 'ldm'))
    try:
        spec = importlib.util.spec_from_file_location(f'official_{Path(path).stem}', root / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root / 'ldm'))
    return module


def make_train(c, variant):
    """(step function, finish(seconds, mem) -> JSON record) of a training step: variant 'irepa' (irepa.train's own
    unit, irepa.Flow, and its step), 'naive', 'official' (the official code's loop body) or 'cached' (Flow's step on
    tokens from a memmap)."""
    naive = variant in ('naive', 'official')  # fp32 eager teacher: as those loops would run it
    latent = c.resolution // 8  # SD-VAE f8: (B, 4, 32, 32) latents at 256 px
    grid = latent // int(c.model.split('/')[1])
    torch.manual_seed(0)
    teacher = None
    if c.teacher != 'none':
        weights = 'random' if c.teacher_depth is None else f'random:{c.teacher_depth}'
        teacher = encoders.load_teacher(c.teacher, weights, grid, device, compile=c.compile and not naive,
                                        dtype=torch.bfloat16 if c.precision == 'bf16' and not naive else None)
    z_dim = teacher.dim if teacher else 768
    if naive:
        model = irepa.build_sit(c.model, input_size=latent, z_dims=[z_dim], projector='conv').to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
    else:  # what irepa.train's Run gives the unit, on these tensors: prepared latents, this device and precision
        cfg = SimpleNamespace(**irepa.DEFAULTS | irepa.RECIPES['irepa'] | dict(model=c.model, grad_ckpt=c.grad_ckpt,
                                                                                compile=c.compile))
        run = SimpleNamespace(cfg=cfg, device=device, autocast=autocast(c), shape=(4, latent), cache_dtypes=[],
                              norm=irepa.LatentNorm('none', [0.0] * 4, [1.0] * 4, device=device),
                              data=SimpleNamespace(num_classes=1000), teachers=[teacher] if teacher else [],
                              wrap=lambda m, compile=True: torch.compile(m) if c.compile and compile else m)
        run.load_teachers = lambda grid: run.teachers or [SimpleNamespace(dim=z_dim)]  # random targets: their width
        unit = irepa.Flow(cfg, run)  # the SiT (seeded as above), its EMA, AdamW, compiled with --compile
        model = unit.model
    x = torch.randn(c.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (c.batch_size,), device=device)
    images = torch.randint(0, 256, (c.batch_size, 3, c.resolution, c.resolution), dtype=torch.uint8, device=device)
    random_targets = [torch.randn(c.batch_size, grid * grid, z_dim, device=device)]

    def targets():  # the teacher runs every step (fp32, eager), as a straightforward loop would
        if teacher is None:
            return random_targets
        with torch.no_grad():
            return [irepa.spatial_norm(teacher(images.float() / 255), 0.6)]

    out = []
    if variant == 'naive':
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

        def step():
            irepa.tf32(False, conv=False)  # PyTorch's fp32 default (cuDNN convs keep TF32)
            losses = irepa.flow_loss(model, x, y, targets())
            loss = losses['flow'] + 1.0 * losses['align']
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            update_ema(ema, model)
            out[:] = [loss.item()]  # a host sync every step, as most training loops log
            irepa.tf32(cuda, conv=False)  # back to irepa.train's setting for everything else
    elif variant == 'official':  # ldm/train.py's loop body, our weights loaded into the official SiT
        sit, loss_py = (official_module(c, f'ldm/{f}.py') for f in ('models/sit', 'loss'))
        model = sit.SiT_models[c.model](input_size=latent, num_classes=1000, z_dims=[z_dim], decoder_hidden_size=model.
                                        pos_embed.shape[-1], encoder_depth=model.encoder_depth, projection_layer_type=
                                        'conv', proj_kwargs_kernel_size=3, fused_attn=True, qk_norm=False).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0, eps=1e-8)
        loss_fn = loss_py.SILoss(prediction='v', path_type='linear', weighting='uniform',
                                 projection_loss_type='cosine', proj_coeff='1.0')
        net = torch.compile(model) if c.compile else model  # their --compile
        autocast_ = autocast(c)  # accelerate's autocast under --mixed-precision bf16

        held = {}  # the loop's variables, alive until the next iteration rebinds them: what the allocator sees there

        def step():
            with autocast_:
                loss, proj_loss, loss_dict = loss_fn(net, x, dict(y=y), zs=targets())  # SILoss reads .item() itself
            held.clear()  # ldm/train.py rebinds the previous iteration's here
            loss_mean, proj_loss_mean = loss.mean(), proj_loss.mean()
            held.update(loss=loss_mean + proj_loss_mean, proj_loss=proj_loss, loss_dict=loss_dict)
            held['loss'].backward()
            held['grad_norm'] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model)
            out[:] = [loss_mean.item() + proj_loss_mean.item()]  # its log line's .item()s
    else:
        moments = torch.cat([x, torch.zeros_like(x)], 1)  # posterior mean x and std 0: the step trains on x
        if variant != 'cached':
            cached = tuple
        else:  # 8 batches of the teacher's tokens in a memmap, read batch by batch as the loader does
            tokens = irepa.cache_tokens(run.teachers, images, c.precision)[0]
            run.cache_dtypes = [tokens.dtype]
            tmp = tempfile.TemporaryDirectory()
            mm = np.lib.format.open_memmap(Path(tmp.name) / 'tokens-0.npy', mode='w+', dtype=irepa.CACHE_DTYPES[
                tokens.dtype], shape=(8 * c.batch_size, *tokens.shape[1:]))
            mm[:] = tokens.cpu().view(getattr(torch, mm.dtype.name)).repeat(8, 1, 1).numpy()
            rows = iter(range(10 ** 9))

            def cached():  # as Run.batch serves them: the int16 bits to the device, viewed as the cache's dtype
                i = next(rows) % 8 * c.batch_size
                part = torch.from_numpy(np.array(mm[i: i + c.batch_size]))
                return [(part.pin_memory() if cuda else part).to(device, non_blocking=True).view(tokens.dtype)]

        def step():
            r = unit.step(images, moments, y, irepa.teacher_targets(run, images, cached()) if teacher else
                          random_targets)
            out[:] = [r['flow'], r['align']]

    def finish(sec, mem, faults):
        student = irepa.sit_train_flops(model)  # the 3x3 conv projector (~2% at XL/2) is not counted
        blocks = f", {len(teacher.model.blocks)} blocks" if hasattr(getattr(teacher, 'model', None), 'blocks') else ''
        extra = dict(teacher='none (random targets)' if teacher is None else f"{teacher.name}, random weights{blocks}",
                     last_loss=round(float(out[0]) + (0 if naive else float(out[1])), 4),
                     train_gflop_per_img=round(student / 1e9, 2))
        if naive:
            extra.update(precision='fp32', compile=False, grad_ckpt=False, tf32='off for matmuls (PyTorch default)')
        if variant == 'official':
            extra.update(code=f'official iREPA ({c.official})', precision=c.precision, compile=c.compile,
                         tf32='as irepa.train' if cuda else None)
        if variant == 'cached':
            extra.update(tokens=f'cached ({run.cache_dtypes[0]}, read from a memmap)')
        if teacher is not None and variant != 'cached':
            tf = teacher.flops()
            extra.update(teacher_gflop_per_img=round(tf / 1e9, 2),
                         mfu_with_teacher=round(c.batch_size / sec * (student + tf) / peak, 4) if peak else None)
        return record(c, f'train-{variant}' if variant != 'irepa' else 'train', sec, mem, faults, c.batch_size, student,
                      **extra)
    return step, finish


# -----------------------------------------------------------------------------
# Sampling, spatial metrics, FID features

def make_sample(c):
    latent = c.resolution // 8
    torch.manual_seed(0)
    model = irepa.build_sit(c.model, input_size=latent, z_dims=[768], projector='conv').to(device).eval()
    net = torch.compile(model, dynamic=False) if c.compile else model  # a graph for B, one for the CFG-doubled 2B
    noise = torch.randn(c.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (c.batch_size,), device=device)

    def run(steps):
        with autocast(c):
            irepa.sample(net, noise, y, 'sde', steps, cfg_scale=c.cfg_scale, guidance_high=0.7)
    run(2)  # warm-up: t = 1 runs unguided (B), t = 0.04 guided (2B), so both shapes compile here

    def finish(sec, mem, faults):
        # network evaluations per image on irepa.sample's SDE grid: doubled inside the guidance interval t <= 0.7
        ts = torch.linspace(1.0, 0.04, c.sample_steps, dtype=torch.float64).tolist()
        nfe = sum(2 if c.cfg_scale > 1 and t <= 0.7 else 1 for t in ts)
        return record(c, 'sample', sec, mem, faults, c.batch_size,
                      nfe * irepa.sit_train_flops(model) / 3,  # forward = 1/3 of fwd + bwd
                      ms_per_sampler_step=round(sec / c.sample_steps * 1e3, 2), sampler='sde',
                      sample_steps=c.sample_steps, cfg_scale=c.cfg_scale, guidance_high=0.7, nfe_per_img=nfe)
    return lambda: run(c.sample_steps), finish


def make_metrics(c, official=False):
    """LDS, CDS, SRSS and RMSC of --metrics-images random token grids; official: the official spatial_metrics.py."""
    n = c.metrics_images or c.batch_size
    torch.manual_seed(0)
    tokens = torch.randn(n, 256, 768, device=device)  # a 16 x 16 grid of base-size teacher tokens
    masks = torch.rand(n, 256, device=device) > 0.5
    if official:
        sm = official_module(c, 'metrics/spatial_metrics.py')
        run, what = lambda: sm.compute_spatial_metrics(tokens, masks, ['lds', 'cds', 'srss', 'rmsc']), 'official'
    else:
        run, what = lambda: irepa.spatial_metrics(tokens, masks), 'irepa'
    return run, lambda sec, mem, faults: record(c, 'metrics-official' if official else 'metrics', sec, mem, faults, n,
                                                precision='fp32', model=f'{what} spatial metrics on (B, 256, 768)',
                                                compile=False)


def make_fid(c):
    net = fid.FIDInception().eval().requires_grad_(False).to(device)  # random weights: same speed as the real ones
    images = torch.randint(0, 256, (c.fid_batch_size, 3, c.resolution, c.resolution), dtype=torch.uint8, device=device)

    def step():
        with torch.no_grad(), fid.exact_fp32():  # as evaluation runs: fp32, TF32 off
            net(images)
    return step, lambda sec, mem, faults: record(c, 'fid', sec, mem, faults, c.fid_batch_size, precision='fp32',
                                                 model='FIDInception (random weights)', compile=False, tf32=False,
                                                 peak='not compared: fp32 evaluation')


# -----------------------------------------------------------------------------
# Running the workloads

MAKERS = {'train-naive': lambda c: make_train(c, 'naive'), 'train': lambda c: make_train(c, 'irepa'),
          'train-official': lambda c: make_train(c, 'official'), 'train-cached': lambda c: make_train(c, 'cached'),
          'metrics-official': lambda c: make_metrics(c, official=True), 'sample': make_sample,
          'metrics': make_metrics, 'fid': make_fid}


def out_of_memory(e):
    """Whether e is, or wraps, an out-of-memory error (inductor's compile raises BackendCompilerFailed around it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = getattr(e, 'inner_exception', None) or e.__cause__ or e.__context__
    return False


def run_jobs(c, workloads):
    """The JSON records of the workloads of config c, each printed as it is done."""
    families = dict.fromkeys(w.split('-')[0] for w in ORDER if w in workloads)  # train-naive -> train, ...
    jobs = [[w for w in ORDER if w in workloads and w.split('-')[0] == f] for f in families]  # variants take turns
    out = []
    for job in jobs:
        try:
            made = {w: MAKERS[w](c) for w in job}
            n, warmup = (c.sample_repeats, 0) if job == ['sample'] else (c.steps, c.warmup)
            res = timed({w: step for w, (step, _) in made.items()}, warmup, n)
            recs = {w: made[w][1](*res[w]) for w in job}
        except Exception as e:  # torch.compile reports an out-of-memory inside inductor as BackendCompilerFailed
            if not out_of_memory(e):
                raise
            recs = {w: dict(workload=w, model=c.model, device=name, batch_size=c.batch_size, error='out of memory')
                    for w in job}
        for ours, other, key in (('train', 'train-naive', 'speedup'), ('train', 'train-official', 'vs_official'),
                                 ('metrics', 'metrics-official', 'vs_official'),
                                 ('train-cached', 'train', 'vs_online')):
            if 'img_per_s' in recs.get(ours, {}) and 'img_per_s' in recs.get(other, {}):
                recs[ours][key] = round(recs[ours]['img_per_s'] / recs[other]['img_per_s'], 3)
        for rec in recs.values():
            print(json.dumps(rec), flush=True)
        out += recs.values()
        made = res = None
        torch._dynamo.reset()  # compiled graphs keep their model alive: free it before the next job
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            irepa.tf32(True)  # in case an out-of-memory stopped train-naive before it restored it
    return out


# -----------------------------------------------------------------------------
# Memory of a training step, estimated on fake tensors (no allocation, no compute): any model size on a CPU.
# Checked in this project against torch.distributed._tools.mem_tracker.MemTracker on the same fake step (SiT-XL/2,
# batch 8, 256 px, bf16): plain 14.47 GiB measured vs 14.44 estimated, --grad-ckpt 13.05 vs 13.18.
GPUS = {'24 GB': 23.6, '48 GB': 44.4, '80 GB': 79.1, '141 GB': 139.8}  # GiB torch sees on a 4090, L40S, H100, H200
USABLE = 0.9  # of it, for the step: the CUDA context, cuBLAS workspaces, the allocator's fragmentation take the rest
TEACHER_PARAMS = 86.6e6  # DINOv2-B, in bf16 (2 B per parameter); its forward runs without a graph, before the SiT's


def kept_bytes(model_name, resolution, grad_ckpt, batch):
    """(bytes the SiT's bf16 forward keeps for its backward at `batch` images, each storage once, the parameters
    aside; parameter count; depth), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        model = irepa.build_sit(model_name, input_size=resolution // 8, z_dims=[768], projector='conv')
        model.grad_ckpt = grad_ckpt
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        kept, lat, T = {}, resolution // 8, model.pos_embed.shape[1]

        def pack(v):
            if v.untyped_storage()._cdata not in params:  # autocast's bf16 copies of the weights do count
                kept[v.untyped_storage()._cdata] = v.untyped_storage().nbytes()
            return v
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v), torch.autocast('cpu', torch.bfloat16):
            irepa.flow_loss(model, torch.randn(batch, 4, lat, lat), torch.randint(0, 1000, (batch,)),
                            [torch.randn(batch, T, 768)])
    return sum(kept.values()), sum(p.numel() for p in model.parameters()), len(model.blocks)


def step_memory(model_name, resolution=256, teacher_params=TEACHER_PARAMS):
    """{grad_ckpt: (fixed bytes, bytes per image)} of the peak of a bf16 training step (eager; compiled steps keep
    less). Fixed: fp32 weights, EMA and AdamW's two moments (16 B per parameter) and the teacher. Plain: the peak is
    the end of the forward (all activations) or the end of the backward (the fp32 gradients, 4 B per parameter).
    --grad-ckpt: the backward holds the gradients, every block's input and one block recomputed."""
    (a2, n, depth), a4 = kept_bytes(model_name, resolution, False, 2), kept_bytes(model_name, resolution, False, 4)[0]
    per_img, weights16 = (a4 - a2) / 2, a2 - (a4 - a2)  # linear in the batch; the constant: bf16 weight copies
    c2, c4 = (kept_bytes(model_name, resolution, True, b)[0] for b in (2, 4))
    ckpt_img, ckpt_fixed = (c4 - c2) / 2, c2 - (c4 - c2)
    fixed = 16 * n + 2 * teacher_params
    return {False: (fixed + weights16, per_img, fixed + 4 * n),  # (fixed, per image, the backward's end)
            True: (fixed + 4 * n + ckpt_fixed + weights16 / depth, ckpt_img + per_img / depth, 0)}


def fits(memory, gib):
    """The largest per-GPU batch (a multiple of 8) whose estimated peak is within USABLE of `gib`; 0 if none."""
    fixed, per_img, floor = memory
    room = USABLE * gib * 2 ** 30
    return 0 if max(fixed, floor) > room else int((room - fixed) / per_img) // 8 * 8


def memory_suite():
    """The README's table: per model, with and without --grad-ckpt, the estimated peak at batch 32 and the batch that
    fits on each GPU size, at 256 px with the DINOv2-B teacher."""
    print("| model | --grad-ckpt | GiB at batch 32 | " + ' | '.join(GPUS) + ' |')
    print('|---|---|---|' + '---|' * len(GPUS))
    for size in ('S', 'B', 'L', 'XL'):
        mem = step_memory(f'SiT-{size}/2')
        for ckpt in (False, True):
            at32 = max(mem[ckpt][0] + 32 * mem[ckpt][1], mem[ckpt][2]) / 2 ** 30
            batches = [fits(mem[ckpt], g) for g in GPUS.values()]
            print(f"| SiT-{size}/2 | {'yes' if ckpt else 'no'} | {at32:.1f} | " +
                  ' | '.join(f'{b}' if b <= 1024 else '> 1024' for b in batches) + ' |', flush=True)


# -----------------------------------------------------------------------------
# The GPU check: correctness on CUDA (the checks of test_irepa.py's `pytest -m cuda` tests), then throughput

# Seconds per row on one H100 with a cold compile cache, ESTIMATES (no GPU has run this suite yet): compiling the
# SiT-XL/2 step ~60 s, the teacher ~20 s, 13 timed steps ~10 s; a tiny compiled step (the checks) ~25 s per objective.
GPU_ROW_SECONDS = {'parity': 10, 'sampler': 5, 'step': 30, 'train SiT-XL/2': 90, 'train SiT-B/2': 50, 'sample': 40,
                   'fid': 20}


def gpu_suite(budget_s):
    """python bench.py --suite gpu: one JSON line per row, then one table, whatever fails (a failed row says why).
    Correctness: the parity vectors in fp32 with TF32 off, CUDA sampling against the CPU, the compiled bf16 step
    against the fp32 eager one. Throughput: SiT-XL/2 training without and with the DINOv2-B teacher at the largest
    batch the estimate lets fit (halved on out-of-memory, also one inside the compile), SDE sampling, the FID
    Inception, then SiT-B/2. A row whose estimate (GPU_ROW_SECONDS) would end past `budget_s` is skipped. With
    --device cpu: the same rows at toy sizes (SiT-T/2, 64 px), a dry run of the command, with no time budget."""
    import tempfile
    t0, rows = time.time(), []

    def row(what, estimate, fn):  # one row: its record, or why it failed or was skipped
        if time.time() - t0 + estimate > budget_s:
            rec = dict(skipped=f'its ~{estimate} s would pass the {budget_s:.0f} s budget')
        else:
            try:
                rec = fn()
            except Exception as e:  # any failure is a row of the table, not the end of the suite
                rec = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                torch._dynamo.reset()  # what run_jobs does after a row, for the next one
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        rows.append(dict(suite='gpu', row=what, **rec))
        print(json.dumps(rows[-1]), flush=True)

    def check(fn, tol):
        def run():
            value, more = fn()
            return dict(value=value, tol=tol, **more, ok=value <= tol and not more.get('graph_breaks'))
        return run

    def first_steps(objective):
        with tempfile.TemporaryDirectory() as out:
            r = tests.compiled_first_steps(objective, out, device)
        return r.largest_difference, dict(graphs=r.after_third['stats'].get('unique_graphs'),
                                          graph_breaks=sum(r.after_third['graph_break'].values()))

    def train(model, teacher):
        mem = step_memory(model, base.resolution)[False]
        batch = min(512, fits(mem, gib) // 32 * 32) if cuda else 4
        while True:
            rec = run_jobs(SimpleNamespace(**vars(base) | dict(model=model, teacher=teacher, batch_size=batch)),
                           ['train'])[0]
            if 'error' not in rec or batch <= 8:
                return rec
            batch //= 2  # the estimate was too high for this card
    try:
        import test_irepa as tests  # pip install pytest (the README's test command) for this import
    except ImportError as e:
        tests = None
        rows.append(dict(suite='gpu', row='correctness', error=f'{e}: pip install pytest (the test extras)'))
    if tests:
        with fid.exact_fp32():
            row(f'parity vectors, {device.type} fp32, TF32 off', GPU_ROW_SECONDS['parity'], check(
                lambda: (tests.check_parity(tests.vectors_path(), 1e-4, device), {}), 1e-4))
            row(f'sampler {device.type} vs cpu, fp32 SDE', GPU_ROW_SECONDS['sampler'], check(
                lambda: (tests.sampler_device_error(device), {}), 1e-4))
        for objective in tests.GPU_PATH_RECIPES:
            row(f'compiled bf16 step vs fp32 eager ({objective})', GPU_ROW_SECONDS['step'],
                check(lambda: first_steps(objective), tests.STEP_TOL))
    gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if cuda else 1.0
    base = SimpleNamespace(**vars(args) | dict(compile=True, precision='bf16', resolution=256 if cuda else 64,
                                               teacher_depth=None if cuda else 1, steps=10 if cuda else 2, warmup=3,
                                               grad_ckpt=False, sample_steps=50 if cuda else 4, sample_repeats=2))
    big, small = ('SiT-XL/2', 'SiT-B/2') if cuda else ('SiT-T/2', None)
    for model, teacher in [(big, 'none'), (big, 'dinov2')]:
        row(f'train {model}, teacher {teacher}', GPU_ROW_SECONDS['train SiT-XL/2'], lambda: train(model, teacher))
    for workload, extra in (('sample', dict(model=big, batch_size=256 if cuda else 4)),
                            ('fid', dict(fid_batch_size=256 if cuda else 2))):
        row(workload, GPU_ROW_SECONDS[workload], lambda: run_jobs(SimpleNamespace(**vars(base) | extra), [workload])[0])
    for teacher in ('none', 'dinov2') if small else ():
        row(f'train {small}, teacher {teacher}', GPU_ROW_SECONDS['train SiT-B/2'], lambda: train(small, teacher))
    print(f"\n{name}, {time.time() - t0:.0f} s (budget {budget_s:.0f} s)\n| row | result |\n|---|---|")
    for r in rows:
        if 'error' in r or 'skipped' in r:
            result = f"FAILED: {r['error']}" if 'error' in r else f"skipped: {r['skipped']}"
        elif 'tol' in r:
            result = f"{r['value']:.2e} (tol {r['tol']:.0e}) {'ok' if r['ok'] else 'FAILED'}"
        else:
            result = (f"{r['img_per_s']:.1f} img/s, {r['ms_per_step']:.1f} ms/step, batch {r['batch_size']}, peak "
                      f"{r['peak_mem_gb']:.1f} GiB, MFU {r['mfu']}")
        print(f"| {r['row']} | {result} |", flush=True)
    return rows


# -----------------------------------------------------------------------------
# The official code against ours, each in its own process, as a user runs it: in one shared process each code
# inherits the other's allocator state (glibc keeps or returns freed heap depending on what else is alive), which
# favoured ours by a third (issue 23).

def official_suite(rounds):
    """python bench.py --suite official: for each pair (official, ours) of the listed workloads, `rounds` rounds of
    two fresh processes, one per code, the order alternating round by round; both get this command's flags (threads,
    steps, warm-up) and environment. Prints each process's JSON record (with its round), one summary line per pair
    (the medians over the rounds, the ratio official ms / our ms per round: its median and spread, the load average)
    and a table."""
    pairs = [(o, w) for o, w in (('train-official', 'train'), ('metrics-official', 'metrics'))
             if o in workloads and w in workloads]
    runs, load = {w: [] for pair in pairs for w in pair}, [os.getloadavg()[0]]
    for r in range(rounds):
        for pair in pairs:
            for w in pair if r % 2 == 0 else pair[::-1]:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], '--rounds', '0',
                                       '--workloads', w], env=dict(os.environ), capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"round {r + 1}, {w}: exit code {proc.returncode}\n{proc.stderr[-3000:]}")
                rec = dict(json.loads(proc.stdout.splitlines()[-1]), round=r + 1, load_avg_1min=os.getloadavg()[0])
                print(json.dumps(rec), flush=True)
                runs[w].append(rec)
                load.append(rec['load_avg_1min'])
    summary = []
    for o, w in pairs:
        ratios = [a['ms_per_step'] / b['ms_per_step'] for a, b in zip(runs[o], runs[w])]
        med = {k: statistics.median(r['ms_per_step'] for r in runs[k]) for k in (o, w)}
        summary.append(dict(suite='official', workload=w, rounds=rounds, steps_per_process=args.steps,
                            warmup=args.warmup, threads=args.threads, official_ms=[r['ms_per_step'] for r in runs[o]],
                            irepa_ms=[r['ms_per_step'] for r in runs[w]], official_median_ms=med[o],
                            irepa_median_ms=med[w], ratio_per_round=[round(x, 3) for x in ratios],
                            ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                            ratio_max=round(max(ratios), 3), ratio_of_medians=round(med[o] / med[w], 3),
                            official_page_faults=int(statistics.median(r['page_faults'] for r in runs[o])),
                            irepa_page_faults=int(statistics.median(r['page_faults'] for r in runs[w])),
                            load_avg_1min=[min(load), max(load)]))
        print(json.dumps(summary[-1]), flush=True)
    print(f"\nofficial vs irepa, each in its own process, {rounds} alternating rounds of {args.steps} timed steps "
          f"(median) after {args.warmup}, {args.threads} threads; load average {min(load):.1f}-{max(load):.1f}")
    for (o, w), s in zip(pairs, summary):
        print(f"\n| {w}: round | official ms | irepa ms | ratio | official faults | irepa faults |\n" + '|---' * 6 +
              '|')
        for i, (a, b) in enumerate(zip(runs[o], runs[w])):
            print(f"| {i + 1} | {a['ms_per_step']:,.1f} | {b['ms_per_step']:,.1f} | {s['ratio_per_round'][i]:.3f}x | "
                  f"{a['page_faults']:,} | {b['page_faults']:,} |")
        print(f"| median | {s['official_median_ms']:,.1f} | {s['irepa_median_ms']:,.1f} | {s['ratio_median']:.3f}x "
              f"({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | {s['official_page_faults']:,} | "
              f"{s['irepa_page_faults']:,} |")
    return summary


if args.suite == 'memory':
    memory_suite()
elif args.suite == 'gpu':
    gpu_suite(budget_s=args.budget if args.budget is not None else 270 if cuda else float('inf'))
elif args.suite == 'official' and args.rounds:
    official_suite(args.rounds)
else:
    run_jobs(args, workloads)
