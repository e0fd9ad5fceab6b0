"""Tiny random-weight checkpoints built from configs and saved with `save_pretrained`, so tests
load them through the same `from_pretrained` path as real models. Their output is noise: tests
check protocol, shapes, counts and determinism, never quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "Machine learning models turn numbers into other numbers.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Café, naïve, résumé: a few accented words.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds; characters it never saw (emoji, CJK) split
    into several byte tokens, which exercises multi-byte streaming."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(folder: Path, context_length: int = 256) -> Path:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_stable_diffusion(folder: Path) -> Path:
    """A Stable-Diffusion-shaped pipeline at toy size (VAE scale factor 8 as in real SD), with
    a byte-level CLIP tokenizer written locally (no download)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder, vae = _tiny_diffusion_parts(folder)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


# Content may be a string or a list of parts ({"type": "image"} / {"type": "text"}), as
# image-text-to-text templates take it.
LLAVA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(folder: Path, context_length: int = 256) -> Path:
    """A LLaVA-shaped vision-language checkpoint: a tiny CLIP vision tower (32x32 images in
    8x8 patches: 16 image tokens per image), a projector and the tiny Llama, with the tiny
    tokenizer plus an `<image>` token and a PIL-backed CLIP image processor (no torchvision)."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32, initializer_range=0.3,
    )
    # Weights far larger than the usual 0.02 spread make the greedy output depend on the
    # image and the text, so tests can tell images apart (at 0.02 it is always "\n").
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    # CLIP's CLS feature is dropped ("default" strategy): 16 patches + 1 - 1 image tokens.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2_vl() -> tuple[Any, PreTrainedTokenizerFast]:
    """A Qwen2-VL-shaped model (mRoPE positions, 14-pixel patches merged 2x2) and the tiny
    tokenizer with its vision tokens; weights spread wide as in build_tiny_llava."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VISION_TOKENS})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "initializer_range": 0.3,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                "rope_theta": 10000.0},
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "initializer_range": 0.3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], initializer_range=0.3,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config), tokenizer


def build_tiny_qwen2_vl(folder: Path) -> Path:
    """tiny_qwen2_vl with its real processor (56x56 to 112x112 pixels per image). The
    processor's video half needs torchvision: ImportError without it."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    model, tokenizer = tiny_qwen2_vl()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_VL_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_smolvlm(folder: Path) -> Path:
    """A SmolVLM (Idefics3) checkpoint: 32-pixel tiles of 8-pixel patches shuffled 2x2 into
    4 tokens each, images split into tiles plus a global view. Its processor needs
    torchvision and num2words: ImportError without them."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    tiles = [f"<row_{row}_col_{col}>" for row in range(1, 5) for col in range(1, 5)]
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>",
        *tiles,
    ]})
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    config = SmolVLMConfig(
        text_config=text_config.to_dict(),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                       "initializer_range": 0.3},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=0.3,
    )
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            do_image_splitting=True, max_image_size={"longest_edge": 32},
            size={"longest_edge": 64},
        ),
        tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_text_to_video(folder: Path) -> Path:
    """A zeroscope-shaped TextToVideoSDPipeline at toy size: a tiny UNet3DConditionModel, an
    AutoencoderKL with the VAE scale factor 8 of the real ones, a tiny CLIP text encoder with
    a byte-level tokenizer written locally (no download)."""
    from diffusers import (
        DDIMScheduler,
        TextToVideoSDPipeline,
        UNet3DConditionModel,
    )

    tokenizer, text_encoder, vae = _tiny_diffusion_parts(folder)
    unet = UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    )
    pipeline = TextToVideoSDPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def build_tiny_musicgen(folder: Path) -> Path:
    """A MusicGen-shaped checkpoint at toy size: a tiny T5 text encoder with the ByT5 byte
    tokenizer (it needs no vocabulary file), a tiny 32 kHz Encodec at 50 frames per second
    with 4 codebooks of 64 codes, a 2-layer decoder; sampling settings as musicgen-small's."""
    from transformers import (
        ByT5Tokenizer,
        EncodecConfig,
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
    )

    tokenizer = ByT5Tokenizer()
    text_config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    # 4 codebooks: bandwidth (kb/s) = codebooks x frame rate x log2(codebook size) / 1000.
    audio_config = EncodecConfig(
        sampling_rate=32_000, audio_channels=1, codebook_size=64, codebook_dim=16,
        hidden_size=16, num_filters=4, num_lstm_layers=1, upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[4 * 50 * 6 / 1000], normalize=False,
    )
    codes = audio_config.codebook_size  # MusicGen's start/pad token is one past the codes
    decoder_config = MusicgenDecoderConfig(
        vocab_size=codes, num_codebooks=4, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, audio_channels=1,
        pad_token_id=codes, bos_token_id=codes, decoder_start_token_id=codes,
    )
    config = MusicgenConfig(
        text_encoder=text_config.to_dict(), audio_encoder=audio_config.to_dict(),
        decoder=decoder_config.to_dict(),
    )
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config)
    # Encodec starts its codebooks at zero (training fills them), which would decode every
    # code to the same sound; random entries make different codes different audio.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=codes, pad_token_id=codes, bos_token_id=codes, do_sample=True,
        top_k=250, guidance_scale=3.0, max_length=1500,
    )
    processor = MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32_000),
        tokenizer=tokenizer,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_word_piece_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained in milliseconds: `[CLS] a [SEP] b [SEP]` for
    pairs, with segment ids, as cross-encoders and classifiers take them."""
    from tokenizers import normalizers, processors

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
    )


def build_tiny_bert_classifier(
    folder: Path, labels: list[str], max_length: int = 64, problem_type: str | None = None
) -> Path:
    """A BertForSequenceClassification at toy size. One label makes a cross-encoder that
    sentence-transformers' `CrossEncoder(folder)` loads; several, a moderation classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_word_piece_tokenizer(max_length)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, pad_token_id=0,
        num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, problem_type=problem_type,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_diffusion_parts(folder: Path) -> tuple[Any, Any, Any]:
    """The CLIP tokenizer (written locally: byte-level, no download), text encoder and VAE
    (4 blocks, so its scale factor is 8 as in real SD) that the tiny pipelines share."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = folder / "clip-tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)] + [f"{chr(c)}</w>" for c in range(33, 127)]
    vocab = {s: i for i, s in enumerate([*symbols, "<|startoftext|>", "<|endoftext|>"])}
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
    )
    return tokenizer, text_encoder, vae
