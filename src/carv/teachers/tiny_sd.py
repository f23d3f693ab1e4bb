"""A tiny random-weight Stable Diffusion pipeline, built offline from configs (for tests and smoke runs).

Nothing is downloaded: the UNet (``UNet2DConditionModel``, cross-attention width 32), the VAE
(``AutoencoderKL`` with four small down blocks, so 64 px images give 8x8 latents, like SD's factor 8), the
text encoder (``CLIPTextModel`` from a ``CLIPTextConfig``) and a ``CLIPTokenizer`` made from a generated
byte-level vocabulary (every byte symbol, alone and word-final; no merges) are made from configs with
random weights. Attention sits only in the lowest-resolution block (at SD's 64x64 latents, attention at
full resolution would make the tiny model slow on CPU). The teacher it gives is meaningless as a model,
but it exercises the code paths a real Stable Diffusion 1.x / 2.x pipeline does (shapes, dtypes, VAE
scaling, tokenizer padding, guidance, save/load). Needs ``diffusers`` and ``transformers``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from carv._runfolder import atomic_write_json, atomic_write_text

__all__ = ["build_tiny_sd_pipeline", "save_tiny_sd_pipeline"]

TOKEN_LENGTH = 16  # the tokenizer's model_max_length (SD uses 77)
TEXT_WIDTH = 32  # the text encoder's hidden size = the UNet's cross_attention_dim


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (GPT-2 / CLIP's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def _tokenizer(folder: Path, token_length: int = TOKEN_LENGTH) -> Any:
    from transformers import CLIPTokenizer

    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate(syms)}
    for s in syms:
        vocab[s + "</w>"] = len(vocab)
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    atomic_write_json(folder / "vocab.json", vocab, indent=None)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=token_length,
                         pad_token="<|endoftext|>")


def build_tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8,
                           token_length: int = TOKEN_LENGTH) -> Any:
    """A ``StableDiffusionPipeline`` with tiny random-weight parts (``sample_size``: the UNet's latent size;
    ``token_length``: tokens per prompt, SD's 77 for code that assumes it, as threestudio's prompt processor)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)  # the modules' initialisers draw from the global generator; seed it for reproducibility
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=4,
                                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8)
    with tempfile.TemporaryDirectory() as d:
        tokenizer = _tokenizer(Path(d), token_length)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH,
                                                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=token_length,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd_pipeline(path: str | Path, prediction_type: str = "epsilon", seed: int = 0,
                          sample_size: int = 8, token_length: int = TOKEN_LENGTH) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors) into ``path``; returns ``path``."""
    path = Path(path)
    build_tiny_sd_pipeline(prediction_type, seed, sample_size, token_length).save_pretrained(
        str(path), safe_serialization=True)
    return path
