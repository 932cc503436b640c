"""Text encoder `hunyuan`: HunyuanVideo's Llama + CLIP-L pair.

Llama: the HunyuanVideo prompt template, tokens padded to 256 + 95 and
truncated, hidden_states[-3] (the last two layers skipped), positions
[95 : real tokens]. CLIP-L: 77 tokens, pooler_output. A prompt longer than
either takes is cut at the end, with a one-line note on stderr for each.
"""

from __future__ import annotations

import torch

from framepack.backends import EncoderBackend
from framepack.hookspecs import hookimpl
from framepack.notes import note
from framepack.engine.offload import module_device

LLAMA_MAX_TOKENS = 256
CLIP_MAX_TOKENS = 77


class HunyuanTextEncoder:
    def __init__(self, llama, clip, tokenizer, tokenizer_2) -> None:
        self.llama, self.clip = llama, clip
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        # Right padding keeps real tokens at the front, where the crop expects them.
        self.tokenizer.padding_side = "right"
        self.modules = {"text_encoder": llama, "text_encoder_2": clip}

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> llama (1, L <= 256, 4096), clip pooler (1, 768)."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]  # 95: the template's own tokens
        self._note_cut(prompt, DEFAULT_PROMPT_TEMPLATE["template"], crop)
        tokens = self.tokenizer(
            [DEFAULT_PROMPT_TEMPLATE["template"].format(prompt)],
            padding="max_length",
            max_length=LLAMA_MAX_TOKENS + crop,
            truncation=True,
            return_tensors="pt",
        )
        device = module_device(self.llama)
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        real = int(mask.sum())
        hidden = self.llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
        llama_vec = hidden[:, crop:real]

        clip_ids = self.tokenizer_2(
            [prompt], padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        pooler = self.clip(clip_ids.to(module_device(self.clip)), output_hidden_states=False).pooler_output
        return llama_vec, pooler

    def _note_cut(self, prompt: str, template: str, crop: int) -> None:
        """Say what the truncation in encode() drops, counted without truncating
        (verbose=False: no "longer than the maximum" warning from transformers)."""
        # Llama: the window holds 256 + crop tokens of the template with the prompt
        # in it; the template's prefix (with BOS) takes crop of them.
        prefix = template[: template.index("{}")]
        before = len(self.tokenizer(prefix, verbose=False).input_ids)
        length = len(self.tokenizer(prefix + prompt, verbose=False).input_ids) - before
        _note("Llama", length, LLAMA_MAX_TOKENS + crop - before)
        # CLIP: 77 with its start and end tokens.
        specials = self.tokenizer_2.num_special_tokens_to_add()
        length = len(self.tokenizer_2(prompt, add_special_tokens=False, verbose=False).input_ids)
        _note("CLIP", length, CLIP_MAX_TOKENS - specials)


def _note(encoder: str, length: int, takes: int) -> None:
    if length > takes:
        note(f"the prompt is {length} tokens long; the {encoder} encoder takes {takes}, "
             f"so the last {length - takes} tokens are ignored")


def load(source, options, dtype: torch.dtype, quantize: str = "none") -> HunyuanTextEncoder:
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    from framepack.models.quantize import text_quantization_config

    # AutoTokenizer, not LlamaTokenizerFast: in transformers 5 that class
    # rebuilds a Llama-3 style tokenizer from its vocabulary and gets ids wrong.
    parts = {}
    # NF4 applies to the 8B Llama only; CLIP-L is small enough as it is.
    llama_quant = text_quantization_config(quantize, dtype)
    for part, cls, quant in (("text_encoder", LlamaModel, llama_quant), ("text_encoder_2", CLIPTextModel, None)):
        where, sub = source.location(part)
        extra = {"quantization_config": quant} if quant is not None else {}
        with source.loading(part):
            parts[part] = cls.from_pretrained(where, subfolder=sub, dtype=dtype, use_safetensors=True, **extra).eval()
    for part in ("tokenizer", "tokenizer_2"):
        where, sub = source.location(part)
        with source.loading(part):
            parts[part] = AutoTokenizer.from_pretrained(where, subfolder=sub)
    return HunyuanTextEncoder(parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"], parts["tokenizer_2"])


@hookimpl
def framepack_register_encoders(register):
    register(
        EncoderBackend(
            name="hunyuan",
            kind="text",
            load=load,
            parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
            description="HunyuanVideo Llama (hidden_states[-3]) + CLIP-L pooler",
        )
    )
