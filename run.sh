#!/usr/bin/env bash
# The main sweep: teachers x recipes (REPA, iREPA) at one SiT size -> the results table, the correlation panel and the
# convergence figure (every run's curves overlaid: irepa.py plot).
#
#   bash run.sh              prepare latents once; per teacher and recipe: train, sample 50K, evaluate;
#                            per teacher: spatial metrics + linear probe; then results.{csv,md}, correlation.png
#                            and convergence.png (with EVAL_EVERY: FID against steps and GPU-hours, REPA vs iREPA)
#   bash run.sh --dry-run    print every command and its estimated GPU-hours; run nothing
#   bash run.sh smoke        the whole sweep offline on the CPU in minutes, with RANDOM weights
#                            (exercises the code only)
#
# Every setting below can be overridden from the environment, e.g.
#   MODEL=SiT-B/2 TEACHERS="dinov2 dinov3" DATA=/data/imagenet/train REF=VIRTUAL_imagenet256_labeled.npz bash run.sh
# GPUs and nodes come from the environment too: NPROC (GPUs per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
# with several nodes run the same command on each (OUT on a shared filesystem): every node trains and samples, the
# first one then evaluates and writes the table. Every stage skips work whose output exists and is complete, so a
# killed sweep continues where it stopped (training resumes from its newest checkpoint, sampling from its shards).
# Relative paths are relative to this directory.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1  # the stages' output reaches the terminal and their logs as it is written

# -----------------------------------------------------------------------------
# Settings

TEACHERS=${TEACHERS:-"dinov2 dinov3 webssl-vit-dino1b pe-vit-g"}  # the paper's Table 3: DINOv2-B, DINOv3-B,
                                                                   # WebSSL-1B, PE-Core-G
EXTRA_TEACHERS=${EXTRA_TEACHERS:-}            # more teachers (python encoders.py --list), e.g. "siglip2 mae"
RECIPES=${RECIPES:-"repa irepa"}              # rows of irepa.RECIPES: also conv-only spnorm-mlp (Table 3),
                                              # repa-e irepa-e, meanflow-repa meanflow-irepa, jit-repa jit-irepa
ENCODER_WEIGHTS=${ENCODER_WEIGHTS:-auto}      # auto: Hugging Face hub or its cache; WEIGHTS_DIR/<teacher>.* wins if
                                              # present
TEACHER_CACHE=${TEACHER_CACHE:-}              # a folder: each teacher's tokens computed once (--teacher-cache), in
                                              # TEACHER_CACHE/<teacher>-<RES>px, shared by its recipes; empty: online
WEIGHTS_DIR=${WEIGHTS_DIR:-}                  # offline: one file per teacher, named by its canonical name (see README)
MODEL=${MODEL:-SiT-XL/2}                      # or SiT-B/2
JIT_MODEL=${JIT_MODEL:-JiT-B/16}              # the JiT recipes' model: pixel space (no latents, no VAE, images)
JIT_SAMPLE_STEPS=${JIT_SAMPLE_STEPS:-50}      # JiT samples with its own sampler: Heun, 50 steps (the official's)
JIT_CFG=${JIT_CFG:-1.0}                       # JiT's guidance, on t in (0.1, 1) when above 1 (JiT-B/16's own: 2.9)
STEPS=${STEPS:-100000}                        # the paper's tables: 100K steps
BATCH=${BATCH:-256}                           # global batch, whatever the number of GPUs
CKPT_EVERY=${CKPT_EVERY:-25000}               # a killed run loses at most this many steps (XL/2 checkpoint: ~11 GB)
DATA=${DATA:-/data/imagenet/train}            # ImageNet train, <class>/*.JPEG
RES=${RES:-256}
VAE=${VAE:-sd-vae-ft-mse}
NUM_SAMPLES=${NUM_SAMPLES:-50000}             # the paper's sampler: SDE, 250 steps, no guidance, random labels
SAMPLE_MODE=${SAMPLE_MODE:-sde}
SAMPLE_STEPS=${SAMPLE_STEPS:-250}
CFG=${CFG:-1.0}
MF_STEPS=${MF_STEPS:-1}                       # MeanFlow recipes sample with --mode meanflow, 1 NFE (or 2, 4)
SAMPLE_BATCH=${SAMPLE_BATCH:-256}             # per GPU, as the official generate.py
SAMPLE_PRECISION=${SAMPLE_PRECISION:-fp32}    # fp32 (+TF32) as the official generate.py; bf16 is faster
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's ImageNet 256 reference batch
INCEPTION=${INCEPTION:-${IREPA_INCEPTION:-}}  # pt_inception-2015-12-05-6726825d.pth (empty: the torch hub cache)
EVAL_EVERY=${EVAL_EVERY:-0}                   # FID of the EMA model every N training steps (10K images, SDE 250,
                                              # against REF): the FID curves of convergence.png; 0: none
PROBE_DATA=${PROBE_DATA:-/data/imagenet/val}  # images with labels for the spatial metrics and the linear probe
                                              # (<class>/*)
PROBE_IMAGES=${PROBE_IMAGES:-10000}           # tokens are held in memory: 10K x 256 x D fp16 (3.9 GB at D = 768)
MASKS=${MASKS:-}                              # foreground masks for SRSS (same relative paths, .png); empty: no SRSS
OUT=${OUT:-out/sweep}
LAT=${LAT:-$OUT/latents}                      # prepared once; share it between sweeps with LAT=...
TRAIN_ARGS=${TRAIN_ARGS:-}                    # extra flags, e.g. "--lpips-weights vgg.pth --disc-weights disc.pt" for
                                              # REPA-E
PREPARE_ARGS=${PREPARE_ARGS:-}
SAMPLE_ARGS=${SAMPLE_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
METRICS_ARGS=${METRICS_ARGS:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCH=${LAUNCH:-}                            # the launcher of the GPU stages; empty: torchrun with the settings above
PYTHON=${PYTHON:-python}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}               # dense bf16 peak of one GPU (H100/H200 SXM); A100: 312
MFU=${MFU:-0.40}                              # assumed sustained share of that peak, for the GPU-hour estimates

DRY=; SMOKE=
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument '$arg' (accepted: smoke, --dry-run, --help)" >&2; exit 2 ;;
    esac
done

# The smoke run: every stage, tiny and offline. Its numbers mean nothing: random teachers, VAE and Inception.
if [[ $SMOKE ]]; then
    cat <<'EOF'
################################################################################################################
#  SMOKE RUN: random-weight teachers (1 block), a random tiny VAE, a random-weight Inception, the built-in      #
#  synthetic images, 6 training steps. It exercises every stage of the sweep; its FIDs and correlations are     #
#  MEANINGLESS and must never be compared with the paper.                                                     #
################################################################################################################
EOF
    OUT=${SMOKE_OUT:-out/smoke}; LAT=$OUT/latents
    TEACHERS="dinov2 pe"; EXTRA_TEACHERS=; RECIPES="repa irepa"; ENCODER_WEIGHTS=random:1; WEIGHTS_DIR=
    TEACHER_CACHE=$OUT/teacher-cache
    MODEL=SiT-T/2; STEPS=6; BATCH=8; CKPT_EVERY=3; DATA=; RES=32; VAE=random:tiny
    NUM_SAMPLES=16; SAMPLE_MODE=sde; SAMPLE_STEPS=5; CFG=1.0; SAMPLE_BATCH=16; SAMPLE_PRECISION=fp32
    REF=$OUT/ref.npz; INCEPTION=random; PROBE_DATA=; PROBE_IMAGES=64; MASKS=
    PREPARE_ARGS="--synthetic-size 256 --num-workers 0 --device cpu"
    TRAIN_ARGS="--num-workers 0 --device cpu --log-every 2 --sample-every 0"
    SAMPLE_ARGS="--device cpu"
    EVAL_ARGS="--is-split 16 --device cpu --cache-dir $OUT/fid-cache"
    METRICS_ARGS="--lp-steps 20 --device cpu"
    NPROC=1; NNODES=1; NODE_RANK=0; LAUNCH=${LAUNCH:-$PYTHON}; N_TRAIN=256
fi

# GPUs per node: NPROC, else nvidia-smi's list (not queried by --dry-run, which assumes 8 unless NPROC is set)
if [[ -z ${NPROC:-} ]]; then
    if [[ $DRY ]]; then NPROC=8; echo "NPROC unset: the dry run assumes 8 GPUs per node"
    else NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true); fi
    (( NPROC > 0 )) || NPROC=1
fi
WORLD=$(( NPROC * NNODES ))
if [[ -z $LAUNCH ]]; then
    if (( NNODES > 1 )); then
        LAUNCH="torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC"
        LAUNCH+=" --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT"
    else
        LAUNCH="torchrun --standalone --nproc_per_node=$NPROC"
    fi
fi
read -ra LAUNCH <<< "$LAUNCH"
read -ra TRAIN_EXTRA <<< "$TRAIN_ARGS"; read -ra PREPARE_EXTRA <<< "$PREPARE_ARGS"
read -ra SAMPLE_EXTRA <<< "$SAMPLE_ARGS"; read -ra EVAL_EXTRA <<< "$EVAL_ARGS"
read -ra METRICS_EXTRA <<< "$METRICS_ARGS"

# -----------------------------------------------------------------------------
# Helpers

SAFE='^[A-Za-z0-9_./:=,@%+-]+$'
show() {  # print a command so that it can be pasted back into a shell
    local a s=
    for a in "$@"; do
        if [[ $a =~ $SAFE ]]; then s+="$a "; else s+="'${a//\'/\'\\\'\'}' "; fi
    done
    echo "+ ${s% }"
}

# stale OUTPUT INPUTS...: OUTPUT exists but an input is newer. A real run then deletes it, so that its stage runs again.
stale() {
    local out=$1 f; shift
    [[ -e $out ]] || return 0
    for f; do
        if [[ -e $f && $f -nt $out ]]; then
            if [[ $DRY ]]; then echo "note: $out is older than $f; a real run remakes it"; else rm -f "$out"; fi
            return 0
        fi
    done
}

# GPU-hours of FLOPS (bf16-equivalent) at MFU of PEAK_TFLOPS, accumulated into TOTAL (all stages) and TODO (to run)
TOTAL=0; TODO=0
gpu_hours() { awk -v f="$1" -v p="$PEAK_TFLOPS" -v m="$MFU" 'BEGIN { printf "%.3g", f / (p * 1e12 * m) / 3600 }'; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { print a + b }'; }

# stage NAME OUTPUT FLOPS GPUS COMMAND...: run COMMAND unless OUTPUT exists. Every tool writes its output last and
# atomically (meta.json, a checkpoint, the .npz, the .json), so an existing output is a complete one. The command's
# output also goes to $OUT/logs/NAME.log; a failing stage stops the sweep, named with its log and its exit code (75: a
# training or sampling stopped by SIGTERM/SIGINT or --time-limit after its checkpoint; rerun to go on; 2: a user error).
stage() {
    local name=$1 out=$2 flops=$3 gpus=$4; shift 4
    local h; h=$(gpu_hours "$flops")
    TOTAL=$(add "$TOTAL" "$h")
    echo
    if [[ $flops == 0 ]]; then
        echo "== $name"
    else
        echo "== $name: ~$h GPU-h ($(awk -v h="$h" -v g="$gpus" 'BEGIN { printf "%.3g", h / g }') h on" \
            "$gpus GPU(s))"
    fi
    if [[ -e $out ]]; then
        echo "skip $name: $out exists"
        return 0
    fi
    TODO=$(add "$TODO" "$h")
    show "$@"
    [[ $DRY ]] && return 0
    local t0=$SECONDS rc=0 log=$OUT/logs/${name//[^A-Za-z0-9._-]/_}.log
    mkdir -p "$OUT/logs"
    # tee ignores the stop signals: it outlives the stage's own stop (checkpoint, last words), so no write hits a closed
    # pipe
    "$@" > >(trap '' INT TERM; exec tee "$log") 2>&1 || rc=$?
    if (( rc )); then
        echo "run.sh: stage '$name' failed with exit code $rc; its log: $log" >&2
        exit "$rc"
    fi
    echo "done $name in $(( SECONDS - t0 )) s"
}

# -----------------------------------------------------------------------------
# FLOP counts (meta device: no weights, no GPU), canonical teacher names and each recipe's objective, from the code

info=$(CUDA_VISIBLE_DEVICES= SWEEP_RECIPES="$RECIPES" "$PYTHON" - "$MODEL" "$RES" "$VAE" "$JIT_MODEL" \
    $TEACHERS $EXTRA_TEACHERS <<'EOF'
import contextlib, io, os, sys, torch
import encoders, irepa
model, res, vae, jit_model, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
for r in os.environ['SWEEP_RECIPES'].split():
    if r not in irepa.RECIPES:
        sys.exit(f"run.sh: unknown recipe '{r}' in RECIPES; the recipes are {', '.join(irepa.RECIPES)}")
    print('recipe', r, irepa.RECIPES[r]['objective'])
down, channels = {'none': (1, 3), 'random:tiny': (2, 4)}.get(vae, (8, 4))  # SD-VAE f8d4, the tiny test VAE f2d4
with torch.device('meta'):
    sit = irepa.build_sit(model, input_size=res // down, in_channels=channels, num_classes=1000)
grid = res // down // int(model.split('/')[1])
print('grid', grid)
print('sit_train', irepa.sit_train_flops(sit))  # per image: 6 (12 L D^2 T + 2 L T^2 D)
print('sit_fwd', irepa.sit_train_flops(sit) // 3)
jit_grid = grid
if any(irepa.RECIPES[r]['objective'] == 'jit' for r in os.environ['SWEEP_RECIPES'].split()):
    with torch.device('meta'):  # the JiT recipes' model, on images
        jit = irepa.JiT(**irepa.jit_args(jit_model, input_size=res, num_classes=1000, z_dims=()))
    jit_grid = res // jit.patch_size
    print('jit_train', irepa.sit_train_flops(jit))  # the same count: SwiGLU at 2/3 width has an MLP's FLOPs
seen = set()
for n in names:
    c = encoders.resolve_teacher(n)
    if c not in seen:
        seen.add(c)
        with contextlib.redirect_stderr(io.StringIO()):  # the random-weights warning of a FLOP count
            t = encoders.load_teacher(c, 'random', grid=grid, device='meta')
        with contextlib.redirect_stderr(io.StringIO()):  # and on the JiT patch grid
            jt = t if jit_grid == grid else encoders.load_teacher(c, 'random', grid=jit_grid, device='meta')
        print('teacher', c, t.flops(), t.dim, grid * grid, jt.flops())  # forward per image, width, tokens; JiT's
EOF
)
declare -A TFLOPS TSHAPE OBJECTIVE JTFLOPS  # TSHAPE: the teacher's width and token count; JTFLOPS: on JiT's grid
ALL=(); JIT_TRAIN=0
while read -r key a b c d e; do
    case $key in
        recipe) OBJECTIVE[$a]=$b ;;  # flow, repa-e, meanflow or jit
        grid) GRID=$a ;;
        sit_train) SIT_TRAIN=$a ;;
        sit_fwd) SIT_FWD=$a ;;
        jit_train) JIT_TRAIN=$a ;;
        teacher) ALL+=("$a"); TFLOPS[$a]=$b; TSHAPE[$a]="$c $d"; JTFLOPS[$a]=$e ;;
    esac
done <<< "$info"
need_latents=; images=  # REPA-E trains the VAE on images, JiT its model; the others train on prepared latents
for r in $RECIPES; do
    case ${OBJECTIVE[$r]} in repa-e|jit) images=1 ;; *) need_latents=1 ;; esac
done

VAE_ENC=2.73e11      # SD-VAE encoder forward at 256 px, FLOPs (torch FlopCounterMode)
VAE_DEC=6.22e11      # SD-VAE decoder forward from 32x32x4
INCEPTION_FWD=1.14e10
IMAGENET=1281167
N_TRAIN=${N_TRAIN:-$IMAGENET}  # training images, for the teacher cache's size and pass
STEP=$(printf %07d "$STEPS")
echo "sweep: $MODEL, $STEPS steps x $BATCH images, teachers ${ALL[*]}, recipes $RECIPES -> $OUT"
echo "GPUs: $NPROC per node x $NNODES node(s) ($LAUNCH); costs: FLOPs / ($MFU x $PEAK_TFLOPS TFLOP/s bf16 per GPU);" \
     "TF32 counted at half that rate, fp32 at 1/15"
[[ $DRY ]] && echo "dry run: printing the commands, running none of them"

if [[ ! $DRY && ! $SMOKE ]]; then  # fail before days of training, not after
    [[ -e $LAT/meta.json && ! $images || -d $DATA ]] || {
        echo "run.sh: DATA=$DATA is not a folder (ImageNet train, <class>/*.JPEG)" >&2; exit 1; }
    [[ -e $REF ]] || echo "warning: REF=$REF does not exist yet; the evaluations need it (see README)" >&2
    [[ -z $PROBE_DATA || -d $PROBE_DATA ]] ||
        echo "warning: PROBE_DATA=$PROBE_DATA is not a folder; the metrics need it" >&2
fi

weights() {  # the --encoder-weights of teacher $1
    local f
    if [[ $WEIGHTS_DIR ]]; then
        for f in "$WEIGHTS_DIR/$1".*; do [[ -e $f ]] && { echo "$f"; return; }; done
    fi
    echo "$ENCODER_WEIGHTS"
}

# -----------------------------------------------------------------------------
# 1. Latents, once: the SD-VAE posterior mean/std of every training image, and the per-channel latent statistics

if [[ ! $need_latents ]]; then
    echo "no latents to prepare: every recipe trains on images (REPA-E: its VAE; JiT: in pixel space)"
elif [[ $SMOKE ]]; then
    stage "prepare (synthetic set)" "$LAT/meta.json" 0 1 \
        "${LAUNCH[@]}" irepa.py --prepare --vae "$VAE" --resolution "$RES" --out-dir "$LAT" "${PREPARE_EXTRA[@]}"
else
    # the VAE's convolutions run on TF32 (cuDNN's default): half bf16's rate; JPEG decoding may well be the real limit
    stage "prepare $DATA" "$LAT/meta.json" "$(awk "BEGIN { print $IMAGENET * $VAE_ENC * 2 }")" "$WORLD" \
        "${LAUNCH[@]}" irepa.py --prepare --data-path "$DATA" --vae "$VAE" --resolution "$RES" --out-dir "$LAT" \
        "${PREPARE_EXTRA[@]}"
fi

# -----------------------------------------------------------------------------
# 2. Per teacher and recipe: train, then sample (on every node)

sample_file() {  # run directory -> its sample batch
    case ${OBJECTIVE[$2]} in
        meanflow) echo "$1/samples/$STEP-meanflow$MF_STEPS-n$NUM_SAMPLES.npz" ;;
        jit) echo "$1/samples/$STEP-heun$JIT_SAMPLE_STEPS-cfg$JIT_CFG-n$NUM_SAMPLES.npz" ;;
        *) echo "$1/samples/$STEP-$SAMPLE_MODE$SAMPLE_STEPS-cfg$CFG-n$NUM_SAMPLES.npz" ;;
    esac
}
run_dir() {  # teacher, recipe -> the run's folder, named by its model
    local m=$MODEL; [[ ${OBJECTIVE[$2]} == jit ]] && m=$JIT_MODEL
    echo "$OUT/runs/${m//\//-}-$1-$2"
}
# The teacher-token cache (TEACHER_CACHE): each teacher runs once over the training images instead of in every step of
# every recipe (the paper's 100K steps x 256 are 20 epochs of ImageNet); its first training run builds the cache.
n_recipes=0; builder=  # the recipes that can read the cache (JiT's per-image flip rules it out); the first builds it
for r in $RECIPES; do
    [[ ${OBJECTIVE[$r]} == jit ]] && continue
    n_recipes=$(( n_recipes + 1 )); builder=${builder:-$r}
done
if [[ $DRY || $TEACHER_CACHE ]] && (( n_recipes > 0 )); then
    echo
    echo "teacher tokens, online (every step of the $n_recipes recipes) or cached" \
        "(one pass, TEACHER_CACHE=${TEACHER_CACHE:-unset}):"
    for t in "${ALL[@]}"; do
        read -r dim tokens <<< "${TSHAPE[$t]}"
        awk -v t="$t" -v n="$N_TRAIN" -v d="$dim" -v k="$tokens" -v f="${TFLOPS[$t]}" -v s="$STEPS" -v bs="$BATCH" \
            -v r="$n_recipes" -v sit="$SIT_TRAIN" -v p="$PEAK_TFLOPS" -v m="$MFU" 'BEGIN {
            h = 1 / (p * 1e12 * m) / 3600; on = r * s * bs * f * h; once = n * f * h; all = r * s * bs * sit * h
            printf "  %s: cache %d x %d x %d x 2 B (bf16) = %.1f GB; the teacher %.3g GPU-h online vs %.3g cached;",
                t, n, k, d, n * k * d * 2 / 1e9, on, once
            printf " its %d trainings %.3g vs %.3g GPU-h\n", r, all + on, all + once }'
    done
fi

for t in "${ALL[@]}"; do
    for r in $RECIPES; do
        run=$(run_dir "$t" "$r"); tag=$(basename "$run"); tag=${tag%-"$t-$r"}
        cache=(); [[ $TEACHER_CACHE ]] && cache=(--teacher-cache "$TEACHER_CACHE/$t-${RES}px")
        data=$LAT; [[ ${OBJECTIVE[$r]} == repa-e ]] && data=$DATA  # REPA-E trains the VAE, so it reads images
        model=$MODEL; vae=$VAE; sit=$SIT_TRAIN; tf=${TFLOPS[$t]}
        if [[ ${OBJECTIVE[$r]} == jit ]]; then  # pixel space; its per-image flip rules out the teacher cache
            data=$DATA; model=$JIT_MODEL; vae=none; sit=$JIT_TRAIN; tf=${JTFLOPS[$t]}; cache=()
        fi
        resume=(); compgen -G "$run/checkpoints/*.pt" > /dev/null && resume=(--resume)
        teacher=$(awk "BEGIN { print $STEPS * $BATCH * $tf }")  # the teacher's forward in every step
        if [[ ${cache[*]} ]]; then  # or once: the teacher's first run builds its cache, unless it is complete
            teacher=0
            [[ $r == "$builder" && ! -e $TEACHER_CACHE/$t-${RES}px/meta.json ]] &&
                teacher=$(awk "BEGIN { print $N_TRAIN * ${TFLOPS[$t]} }")
        fi
        flops=$(awk "BEGIN { print $STEPS * $BATCH * $sit + $teacher }")  # student fwd+bwd, teacher fwd
        evals=()
        if (( EVAL_EVERY > 0 )); then  # + each evaluation's 10K images: SDE 250 steps, decoding, Inception
            evals=(--eval-every "$EVAL_EVERY" --eval-ref "$REF" ${INCEPTION:+--inception "$INCEPTION"})
            dec=$VAE_DEC; [[ ${OBJECTIVE[$r]} == jit ]] && dec=0  # JiT: pixels, nothing to decode
            flops=$(awk "BEGIN { print $flops + int($STEPS / $EVAL_EVERY) * 10000 * (250 * $sit / 3 + $dec \
                + $INCEPTION_FWD) }")
        fi
        [[ ${OBJECTIVE[$r]} == repa-e ]] &&
            flops=$(awk "BEGIN { print $flops + $STEPS * $BATCH * 3 * ($VAE_ENC + $VAE_DEC) }")  # + VAE fwd+bwd
        [[ ${OBJECTIVE[$r]} == meanflow ]] &&
            flops=$(awk "BEGIN { print $flops + $STEPS * $BATCH * 4 * $SIT_FWD }")  # + JVP, guidance
        stage "train $tag $t $r" "$run/checkpoints/$STEP.pt" "$flops" "$WORLD" \
            "${LAUNCH[@]}" irepa.py --data-path "$data" --vae "$vae" --resolution "$RES" --model "$model" \
            --encoder "$t" --encoder-weights "$(weights "$t")" --recipe "$r" --max-steps "$STEPS" \
            --global-batch-size "$BATCH" --ckpt-every "$CKPT_EVERY" --out-dir "$run" "${cache[@]}" "${resume[@]}" \
            "${evals[@]}" "${TRAIN_EXTRA[@]}"

        fwd=$SIT_FWD
        if [[ ${OBJECTIVE[$r]} == meanflow ]]; then  # 1 NFE, guidance trained in
            sampler=(--mode meanflow --num-steps "$MF_STEPS" --cfg-scale 1.0); nfe=$MF_STEPS
        elif [[ ${OBJECTIVE[$r]} == jit ]]; then  # Heun with its last step Euler: 2 x steps - 1 NFE
            sampler=(--mode heun --num-steps "$JIT_SAMPLE_STEPS" --cfg-scale "$JIT_CFG" --guidance-low 0.1)
            nfe=$(awk "BEGIN { print (2 * $JIT_SAMPLE_STEPS - 1) * ($JIT_CFG > 1 ? 2 : 1) }"); fwd=$(( JIT_TRAIN / 3 ))
        else
            sampler=(--mode "$SAMPLE_MODE" --num-steps "$SAMPLE_STEPS" --cfg-scale "$CFG")
            nfe=$(awk "BEGIN { print $SAMPLE_STEPS * ($CFG > 1 ? 2 : 1) * (\"$SAMPLE_MODE\" == \"heun\" ? 2 : 1) }")
        fi
        slow=$([[ $SAMPLE_PRECISION == fp32 ]] && echo 2 || echo 1)  # fp32 sampling runs on TF32: half bf16's rate
        stage "sample $tag $t $r" "$(sample_file "$run" "$r")" \
            "$(awk "BEGIN { print $NUM_SAMPLES * $nfe * $fwd * $slow }")" "$WORLD" \
            "${LAUNCH[@]}" fid.py sample --ckpt "$run/checkpoints/$STEP.pt" --num-samples "$NUM_SAMPLES" \
            "${sampler[@]}" --batch-size "$SAMPLE_BATCH" --precision "$SAMPLE_PRECISION" \
            --out "$(sample_file "$run" "$r")" "${SAMPLE_EXTRA[@]}"
    done
done

if (( NODE_RANK > 0 )); then
    echo "node $NODE_RANK: training and sampling done; node 0 evaluates and writes the table"
    exit 0
fi

# -----------------------------------------------------------------------------
# 3. Evaluate every sample batch, measure every teacher, write the table (first node, one GPU each)

synthetic_reference() {  # synthetic_reference FILE: 32 images of the built-in set (another seed) as an ADM batch
    "$PYTHON" -c "import os, sys, numpy as np, irepa
np.savez(sys.argv[1] + '.tmp.npz', arr_0=np.stack([irepa.synthetic_image(i, $RES, 10, seed=1)[0] for i in range(32)]))
os.replace(sys.argv[1] + '.tmp.npz', sys.argv[1])" "$1"
}
[[ $SMOKE ]] && stage "reference batch (synthetic)" "$REF" 0 1 synthetic_reference "$REF"
inception=(); [[ $INCEPTION ]] && inception=(--inception "$INCEPTION")
ROWS=()
for t in "${ALL[@]}"; do
    for r in $RECIPES; do
        run=$(run_dir "$t" "$r"); tag=$(basename "$run"); tag=${tag%-"$t-$r"}
        samples=$(sample_file "$run" "$r")
        result=${samples%.npz}.json
        # Inception on the samples and (once, then cached) the 10K reference images, in exact fp32: ~1/15 of bf16's rate
        stage "eval $tag $t $r" "$result" "$(awk "BEGIN { print ($NUM_SAMPLES + 10000) * $INCEPTION_FWD * 15 }")" 1 \
            "$PYTHON" fid.py eval "$REF" "$samples" --json "$result" "${inception[@]}" "${EVAL_EXTRA[@]}"
        ROWS+=("$t" "$r" "$result" "$OUT/metrics/$t.json")  # teacher, recipe, evaluation, measurement
    done
done

for t in "${ALL[@]}"; do
    probe=(); [[ $PROBE_DATA ]] && probe=(--data-path "$PROBE_DATA")
    masks=(); [[ $MASKS ]] && masks=(--masks "$MASKS")
    stage "metrics $t" "$OUT/metrics/$t.json" "$(awk "BEGIN { print $PROBE_IMAGES * ${TFLOPS[$t]} }")" 1 \
        "$PYTHON" irepa.py metrics --encoder "$t" --encoder-weights "$(weights "$t")" "${probe[@]}" "${masks[@]}" \
        --resolution "$RES" --grid "$GRID" --num-images "$PROBE_IMAGES" --out-dir "$OUT/metrics" "${METRICS_EXTRA[@]}"
done

# results_table OUT: results.csv, results.md and correlation-input.csv from the ROWS (teacher, recipe, eval json,
# metrics json); results.csv is written last and marks the stage complete
results_table() {
    "$PYTHON" - "$1" "${ROWS[@]}" <<'EOF'
import csv, json, math, os, sys
out, rows = sys.argv[1], [sys.argv[i:i + 4] for i in range(2, len(sys.argv), 4)]
cols = ['teacher', 'recipe', 'FID', 'sFID', 'IS', 'Precision', 'Recall', 'LDS', 'CDS', 'SRSS', 'RMSC', 'LP']
fmt = dict(FID='.2f', sFID='.2f', IS='.1f', Precision='.3f', Recall='.3f', LDS='.4f', CDS='.4f', SRSS='.4f',
           RMSC='.4f', LP='.3f')
table = []
for teacher, recipe, result, metrics in rows:
    e, m = json.load(open(result)), json.load(open(metrics))
    table.append(dict(teacher=teacher, recipe=recipe, FID=e['FID'], sFID=e['sFID'], IS=e['IS'],
                      Precision=e['precision'], Recall=e['recall'], LDS=m['lds'], CDS=m['cds'], SRSS=m['srss'],
                      RMSC=m['rmsc'], LP=m['lp']))
teachers = sorted({r['teacher'] for r in table})
base = 'repa' if any(r['recipe'] == 'repa' for r in table) else table[0]['recipe']  # the paper correlates REPA's FIDs
corr = [r for r in table if r['recipe'] == base] if len(teachers) >= 3 else table
for path, rs in ((os.path.join(out, 'correlation-input.csv'), corr), (os.path.join(out, 'results.csv'), table)):
    with open(path + '.tmp', 'w', newline='') as f:  # results.csv last: it marks the stage complete
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rs)
    os.replace(path + '.tmp', path)
cell = lambda r, c: (r[c] if c in ('teacher', 'recipe') else 'n/a' if r[c] is None or not math.isfinite(r[c])
                     else format(r[c], fmt[c]))
md = (['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
      + ['| ' + ' | '.join(cell(r, c) for c in cols) + ' |' for r in table])
with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
print('\n'.join(md))
print('correlation input: ' + (f'the {base} rows' if len(teachers) >= 3
                               else f'all {len(corr)} rows (fewer than 3 teachers: a code check, not the study)'))
EOF
}

# The table is remade whenever an evaluation or a measurement is newer than it, the panel whenever the table is.
# The paper correlates the REPA rows (one per teacher); with fewer than 3 teachers every row goes in (a code check).
stale "$OUT/results.csv" "$OUT"/runs/*/samples/*.json "$OUT"/metrics/*.json
stage "results table" "$OUT/results.csv" 0 1 results_table "$OUT"
stale "$OUT/correlation.png" "$OUT/results.csv"
n_corr=0; [[ -e $OUT/correlation-input.csv ]] && n_corr=$(( $(wc -l < "$OUT/correlation-input.csv") - 1 ))
if [[ $DRY ]] || (( n_corr >= 3 )); then
    stage "correlation panel" "$OUT/correlation.png" 0 1 \
        "$PYTHON" irepa.py correlate "$OUT/correlation-input.csv" --out "$OUT/correlation.png"
else
    echo "no correlation panel: $n_corr row(s) in $OUT/correlation-input.csv, a correlation needs 3"
fi
# The paper's convergence figure: every run's losses, gradient norms and (EVAL_EVERY) FID, overlaid
stale "$OUT/convergence.png" "$OUT"/runs/*/log.jsonl
stage "convergence figure" "$OUT/convergence.png" 0 1 \
    "$PYTHON" irepa.py plot "$OUT"/runs/*/ --out "$OUT/convergence.png"

echo
awk -v a="$TOTAL" -v t="$TODO" -v g="$WORLD" 'BEGIN {
    printf "estimated cost: %.1f GPU-h for the whole sweep, %.1f GPU-h still to run (~%.1f h on %d GPUs)\n",
        a, t, t / g, g }'
if [[ ! $DRY ]]; then
    echo "results: $OUT/results.md, $OUT/results.csv; correlation panel: $OUT/correlation.png; convergence figure:" \
        "$OUT/convergence.png"
    [[ $SMOKE ]] && echo "(smoke run: RANDOM weights everywhere, the numbers are meaningless)"
fi
exit 0
