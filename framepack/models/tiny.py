"""Build a tiny, randomly initialised FramePack model folder in the real on-disk layout.

Why this exists: the real HunyuanVideo/FramePack checkpoints are tens of gigabytes and
live on the Hugging Face hub. Tests and offline demos still need to exercise the *real*
loading code (``from_pretrained`` with ``subfolder=...``, safetensors only, the
tokenizers' prompt handling, the transformer's FramePack history inputs, the causal
VAE's frame arithmetic). So instead of mocking the models we write a folder that has
exactly the layout of the real one::

    transformer/        HunyuanVideoFramepackTransformer3DModel
    text_encoder/       LlamaModel
    text_encoder_2/     CLIPTextModel
    tokenizer/          Llama-3 style byte-level BPE (fast, right padding)
    tokenizer_2/        CLIPTokenizer
    vae/                AutoencoderKLHunyuanVideo
    image_encoder/      SiglipVisionModel
    feature_extractor/  SiglipImageProcessor

Every part is written with the library's own ``save_pretrained`` and holds tiny float32
random weights, so the folder is about 2 MB, builds in about a second (plus library
imports) and produces noise, not video, when run. The tokenizers are trained here, offline, with
the ``tokenizers`` library. The same seed always gives byte-identical weight files.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports are deferred so importing this module costs nothing
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from tokenizers import Tokenizer
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        LlamaModel,
        PreTrainedTokenizerFast,
        SiglipVisionModel,
    )
    from transformers.image_processing_utils import BaseImageProcessor

__all__ = ["make_tiny_model", "HIDDEN_SIZE", "LLAMA_CROP_START"]

# One width for Llama, CLIP and SigLIP: the transformer's text_embed_dim,
# pooled_projection_dim and image_proj_dim must equal these encoders' outputs.
HIDDEN_SIZE = 32
INTERMEDIATE_SIZE = 64

# The engine (like diffusers' HunyuanVideo pipelines) drops the first 95 positions of the
# Llama encoding: that is how many tokens the prompt template's system part takes with
# the real Llama-3 tokenizer. Our tokenizer is built so the same holds (see _LLAMA_SPLIT).
LLAMA_CROP_START = 95

# Per-part offsets added to the seed, so each model gets its own reproducible stream and
# adding a part later never changes the weights of the others.
_SEED_OFFSETS = {"transformer": 0, "text_encoder": 1, "text_encoder_2": 2, "vae": 3, "image_encoder": 4}

# Llama-3's pre-tokenisation regex. Using the real split rules (words with their leading
# space, digits one to three at a time) is what makes the template's prefix come out at
# exactly 95 tokens once every template word is a single BPE token, as in the real one.
_LLAMA_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA_BOS = "<|begin_of_text|>"
_LLAMA_EOS = "<|end_of_text|>"
_LLAMA_PAD = "<|pad|>"
# The header/eot markers appear literally in DEFAULT_PROMPT_TEMPLATE and must each be
# one token, never split into bytes.
_LLAMA_SPECIALS = [_LLAMA_BOS, _LLAMA_EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", _LLAMA_PAD]
# Cap on Llama BPE training. The corpus is small enough that training stops earlier
# (about 800 tokens), once every corpus word is one token; the cap only bounds the worst
# case.
_BPE_VOCAB_CAP = 4096
_LLAMA_MAX_POSITIONS = 512

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_WORD_END = "</w>"
_CLIP_MAX_LENGTH = 77

# Fixed English text for tokenizer training. Together with the prompt template it gives
# ordinary prompts short, word-sized tokens; its exact content is not important, but it
# must never change silently (it determines token ids and so the embedding shapes).
_CORPUS = """\
A cat walks slowly across a sunny beach at sunset while small waves roll onto the sand.
A dog runs through a green park, chasing a red ball, and jumps over a wooden bench.
The camera pans left to reveal a busy city street with cars, people and tall buildings.
A woman in a blue dress dances in the rain; her hair moves with the wind.
A man rides a bicycle down a mountain road, trees passing quickly on both sides.
Close-up of a flower opening in the morning light, with drops of water on its petals.
Snow falls gently on a quiet village at night, and warm lights glow in the windows.
A bird flies over the ocean, then dives into the water to catch a fish.
Two children play with a kite in a field of tall grass under a bright blue sky.
The girl smiles, turns her head, and waves at the camera. The boy laughs and claps.
An astronaut floats inside a space station, looking out at the earth below.
Fire burns in a stone fireplace; smoke rises slowly and the room is dark and calm.
A car drives along the coast at dawn; the sea is calm and the clouds are pink and gold.
Leaves fall from the trees in autumn. Yellow, orange and brown colors fill the frame.
A robot walks into a bright laboratory, picks up a glass cube and looks at it closely.
Slow motion shot of a horse galloping on a sandy shore, water splashing at its feet.
"""


def make_tiny_model(dest: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random FramePack model folder to ``dest`` and return its path.

    The folder is built in a temporary directory next to ``dest`` and renamed into place
    only when complete, so a crash never leaves a half-written model behind. ``dest`` may
    be missing or an empty directory; anything else raises ``FileExistsError``.
    """
    dest = pathlib.Path(dest)
    _refuse_occupied(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with _no_progress_bars():
            _write_all_parts(tmp, seed)
        # mkdtemp makes the folder 0700; a model folder should be readable like any other.
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _refuse_occupied(dest: pathlib.Path) -> None:
    if dest.is_dir() and any(dest.iterdir()):
        raise FileExistsError(f"refusing to write a tiny model into non-empty directory {dest}")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"refusing to write a tiny model over existing file {dest}")


def _move_into_place(tmp: pathlib.Path, dest: pathlib.Path) -> None:
    # rename(2) may replace an empty directory but never a non-empty one, so a directory
    # filled by someone else while we were building still makes us refuse, not clobber.
    try:
        os.replace(tmp, dest)
    except OSError as err:
        if dest.exists():
            raise FileExistsError(f"{dest} appeared while the tiny model was being built") from err
        raise


def _write_all_parts(root: pathlib.Path, seed: int) -> None:
    llama_tok = _build_llama_tokenizer()
    clip_tok = _build_clip_tokenizer()
    llama_tok.save_pretrained(root / "tokenizer")
    clip_tok.save_pretrained(root / "tokenizer_2")
    _build_feature_extractor().save_pretrained(root / "feature_extractor")

    # transformers 5 always writes safetensors (its save_pretrained has no
    # safe_serialization switch any more); diffusers still takes the flag.
    with _seeded(seed, "text_encoder"):
        _build_text_encoder(llama_tok).save_pretrained(root / "text_encoder")
    with _seeded(seed, "text_encoder_2"):
        _build_text_encoder_2(clip_tok).save_pretrained(root / "text_encoder_2")
    with _seeded(seed, "image_encoder"):
        _build_image_encoder().save_pretrained(root / "image_encoder")
    with _seeded(seed, "transformer"):
        _build_transformer().save_pretrained(root / "transformer", safe_serialization=True)
    with _seeded(seed, "vae"):
        _build_vae().save_pretrained(root / "vae", safe_serialization=True)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    # transformers' save_pretrained draws a "Writing model shards" bar on stderr; this
    # function must stay silent (callers do their own reporting). Restored afterwards.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _seeded(seed: int, part: str) -> Iterator[None]:
    # Weight init draws from torch's global generator. Fork it so the caller's random
    # state is the same before and after building a model.
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _SEED_OFFSETS[part])
        yield


# --------------------------------------------------------------------------- tokenizers


def _prompt_template() -> str:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"]


def _training_corpus() -> list[str]:
    # Special markers are removed from the training text: they are added as whole special
    # tokens afterwards and must not spend merges on their "<|", "_id" pieces.
    template = re.sub(r"<\|[a-z_]+\|>", "\n", _prompt_template().replace("{}", ""))
    return [template, _CORPUS]


def _train_bpe(tokenizer: Tokenizer, corpus: list[str]) -> None:
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_CAP,
        # All 256 byte symbols up front: any input text is then encodable, no <unk>. It
        # also makes training deterministic: every base symbol gets a fixed id (sorted),
        # and the trainer breaks count ties by those ids.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)


def _build_llama_backend() -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    _train_bpe(tok, _training_corpus())
    # Appended after training so, as in Llama-3, the specials sit at the end of the vocab.
    tok.add_special_tokens(_LLAMA_SPECIALS)
    # Llama-3 prepends <|begin_of_text|>; the 95-token crop counts it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_LLAMA_BOS} $A",
        pair=f"{_LLAMA_BOS} $A {_LLAMA_BOS} $B",
        special_tokens=[(_LLAMA_BOS, tok.token_to_id(_LLAMA_BOS))],
    )
    return tok


def _build_llama_tokenizer() -> PreTrainedTokenizerFast:
    # Not LlamaTokenizerFast: in transformers 5 that class (an alias of LlamaTokenizer)
    # hard-codes a SentencePiece-style Metaspace pre-tokenizer and, on from_pretrained,
    # rebuilds its backend from vocab/merges alone, mis-tokenising a byte-level (Llama-3)
    # vocabulary. The generic fast class (TokenizersBackend in transformers 5, which is
    # the tokenizer_class it saves) loads tokenizer.json unchanged, as Llama-3
    # tokenizers are normally shipped; AutoTokenizer then needs no special-casing.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_build_llama_backend(),
        bos_token=_LLAMA_BOS,
        eos_token=_LLAMA_EOS,
        pad_token=_LLAMA_PAD,
        # The engine crops the front of the encoding, so real tokens must come first.
        padding_side="right",
        model_max_length=_LLAMA_MAX_POSITIONS,
    )


def _clip_words() -> Counter[str]:
    """Corpus words exactly as CLIPTokenizer's normaliser and splitter produce them."""
    from transformers import CLIPTokenizer

    # An empty CLIPTokenizer carries the class's own normaliser and pre-tokenizer (it
    # rebuilds them on every load), so the merges are learned on the very same words.
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter[str] = Counter()
    for text in _training_corpus():
        normalized = backend.normalizer.normalize_str(text)
        words.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return words


def _learn_clip_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Plain BPE merge learning, with ties broken by the pair itself.

    Why not tokenizers' BpeTrainer here: with ``end_of_word_suffix`` it numbers the
    "x</w>" symbols in hash-map order and breaks count ties by those numbers, so the merge
    order (and the vocab ids) changes from run to run. The corpus is a few hundred words,
    so a readable loop costs nothing and is deterministic by construction.
    """
    # CLIP's BPE starts each word as its characters with the suffix fused to the last one.
    pieces = {word: [*word[:-1], word[-1] + _CLIP_WORD_END] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in pieces.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += words[word]
        if not pair_counts:
            return merges  # every word is now a single token
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            pieces[word] = _apply_merge(symbols, best)


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers

    merges = _learn_clip_merges(_clip_words())
    # Same id layout as real CLIP: 256 byte symbols, the same 256 word-final ("x</w>"),
    # then one id per merge in merge order, and the two specials last. Having every
    # "x</w>" matters: a word ending in a missing one would become <unk>, which for CLIP
    # is <|endoftext|>, and CLIPTextModel pools at the first <|endoftext|>.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + _CLIP_WORD_END for symbol in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _build_clip_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # CLIPTokenizer builds CLIP's normaliser, splitter, post-processor and decoder itself
    # from vocab + merges (and does the same again on from_pretrained), so we only supply
    # those two.
    vocab, merges = _build_clip_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def _build_feature_extractor() -> BaseImageProcessor:
    from transformers.image_utils import PILImageResampling

    try:
        # Without torchvision, transformers 5 falls back to the PIL processor anyway (with
        # a warning); constructing it directly keeps the build quiet. Either one saves a
        # config that SiglipImageProcessor.from_pretrained reads.
        from transformers import SiglipImageProcessorPil as processor_cls
    except ImportError:  # pragma: no cover - older/newer transformers layouts
        from transformers import SiglipImageProcessor as processor_cls

    # The real SigLIP processor, at 32 px instead of 384.
    return processor_cls(
        do_resize=True,
        size={"height": 32, "width": 32},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------------- models


def _build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> LlamaModel:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        # The engine reads hidden_states[-3], so at least three layers.
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HIDDEN_SIZE // 2,
        # Must cover the engine's 256 + 95 token encoding.
        max_position_embeddings=_LLAMA_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return LlamaModel(config)


def _build_text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        projection_dim=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        # CLIPTextModel pools at the first eos id, so these must be the tokenizer's ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return CLIPTextModel(config)


def _build_image_encoder() -> SiglipVisionModel:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
        # 32 / 8 = 4x4 = 16 patch tokens: the image_embeds the transformer sees.
        image_size=32,
        patch_size=8,
        dtype="float32",
    )
    return SiglipVisionModel(config)


def _build_transformer() -> HunyuanVideoFramepackTransformer3DModel:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=HIDDEN_SIZE,
        pooled_projection_dim=HIDDEN_SIZE,
        rope_theta=256.0,
        # Sums to attention_head_dim (t, h, w), each even for the rotary pairs.
        rope_axes_dim=(4, 6, 6),
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=HIDDEN_SIZE,
        has_clean_x_embedder=True,
    )


def _build_vae() -> AutoencoderKLHunyuanVideo:
    from diffusers import AutoencoderKLHunyuanVideo

    # Four blocks as in the real VAE, so it keeps the real 8x spatial / 4x causal temporal
    # compression (T latent frames <-> 1 + 4 * (T - 1) pixel frames), just 8 channels wide.
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
