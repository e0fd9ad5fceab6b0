"""Music from a text prompt with MusicGen (transformers), encoded to wav, mp3 or flac.

MusicGen predicts its audio codec's codebooks with a delay pattern (codebook i lags i steps),
so `seconds x frame rate` audio frames take `num_codebooks - 1` more decoder steps; the codec
then decodes the frames to audio at its native rate, which is encoded without resampling and
cut to the asked duration.

Sampling is done here, not by `generate`: its sampler draws from the process-wide torch RNG,
which requests on other threads draw from too, so a seed would not reproduce. A logits
processor applies classifier-free guidance and the model's own top-k and temperature, draws
each token from the job's private generator, and hands `generate` (run greedy) scores that
leave that one token.

Registry `options`: `MusicOptions` (engine/contracts/media.py): `default_duration`,
`max_duration` (seconds), `default_guidance` (MusicGen's own default is 3; 1 or less turns
guidance off), `max_prompt_chars`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

from engine.contracts.base import AdapterOptions
from engine.contracts.chat import Sampling
from engine.contracts.media import MediaResult, MusicOptions
from engine.core.audio_codec import MEDIA_TYPES, encode_audio
from engine.core.errors import InvalidRequestError
from engine.core.registry import ModelEntry
from engine.core.sampling import SamplerState, choose_tokens
from engine.core.sources import resolve_source
from models.media import MediaAdapter, StepProgress

log = logging.getLogger(__name__)

MUSIC_FORMATS = ("wav", "mp3", "flac")
# Reports every 1% are plenty: a 30 s clip is ~1500 tokens.
PROGRESS_INCREMENT = 0.01


class _SeededSampler(LogitsProcessor):
    """Guidance, top-k/temperature and a seeded draw; returns scores that leave one token.

    It runs before `generate`'s own guidance processor, on the conditional rows stacked over
    the unconditional ones; it returns the chosen token's scores for both halves, so that
    processor's `uncond + scale * (cond - uncond)` leaves them as they are.
    """

    def __init__(self, guidance_scale: float, sampling: Sampling, seed: int):
        self._guidance = (ClassifierFreeGuidanceLogitsProcessor(guidance_scale)
                          if guidance_scale > 1 else None)
        self._state = SamplerState(dataclasses.replace(sampling, seed=seed), 0, (), 0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        guided = self._guidance(input_ids, scores) if self._guidance is not None else scores
        rows = guided.shape[0]
        # Drawn on the CPU from the job's own random stream, row by row: reproducible anywhere.
        picks = choose_tokens(guided.float().cpu().numpy(), [self._state] * rows)
        tokens = torch.tensor(picks, device=scores.device)
        chosen = torch.full_like(guided, torch.finfo(guided.dtype).min)
        chosen.scatter_(1, tokens[:, None], 0.0)
        return torch.cat([chosen, chosen]) if self._guidance is not None else chosen


class _TokenProgress(StoppingCriteria):
    """Counts decoder steps for progress; raises when the job is cancelled (never stops a run
    otherwise: the length is set by max_new_tokens)."""

    def __init__(self, tracker: StepProgress):
        self._tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        self._tracker.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class MusicGen(MediaAdapter):
    """MusicgenForConditionalGeneration with its processor; one job at a time."""

    options_model: ClassVar[type[AdapterOptions]] = MusicOptions
    label = "music"
    progress_increment = PROGRESS_INCREMENT

    @classmethod
    def task_params(cls, entry: ModelEntry, options: MusicOptions, params: Mapping[str, Any],
                    duration: float) -> dict[str, Any]:
        response_format = params.get("response_format") or "wav"
        if response_format not in MUSIC_FORMATS:
            raise InvalidRequestError(
                f"response_format must be one of {', '.join(MUSIC_FORMATS)}; "
                f"got {response_format!r}", param="response_format",
            )
        return {"response_format": response_format}

    def load(self) -> None:
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        path = resolve_source(self.entry)
        errors = (OSError, ValueError, ImportError)
        self.processor = self.pretrained(AutoProcessor.from_pretrained, path, errors)
        model = self.pretrained(MusicgenForConditionalGeneration.from_pretrained, path, errors,
                                dtype=self.context.dtype, use_safetensors=True)
        self.model = model.to(self.context.device).eval()
        for module in self.model.modules():  # Encodec's LSTM: cuDNN wants one weight block
            if isinstance(module, torch.nn.RNNBase):
                module.flatten_parameters()
        codec = model.config.audio_encoder
        self.sample_rate = int(codec.sampling_rate)
        self.frame_rate = float(codec.frame_rate)  # codec frames per second of audio
        self.num_codebooks = int(model.decoder.num_codebooks)
        defaults = model.generation_config
        self.sampling = Sampling(
            temperature=float(defaults.temperature or 1.0), top_k=int(defaults.top_k or 0),
            top_p=float(defaults.top_p or 1.0),
        )

    def unload(self) -> None:
        self.processor = None
        super().unload()

    def max_new_tokens(self, duration: float) -> int:
        return math.ceil(duration * self.frame_rate) + self.num_codebooks - 1

    def steps(self, params: dict[str, Any]) -> int:
        return self.max_new_tokens(params["duration"])

    @torch.inference_mode()
    def generate(self, params: dict[str, Any], tracker: StepProgress) -> MediaResult:
        new_tokens = tracker.total_steps
        inputs = self.processor(text=[params["prompt"]], padding=True, return_tensors="pt")
        inputs = {k: v.to(self.context.device) for k, v in inputs.items()}
        generation_config = copy.deepcopy(self.model.generation_config)
        # Greedy over scores that leave one token: _SeededSampler has already sampled. The
        # sampling fields get transformers' neutral values (None would be refilled from the
        # model's config, and a greedy run with top_k 250 logs a warning).
        generation_config.update(
            do_sample=False, top_k=50, top_p=1.0, temperature=1.0,
            guidance_scale=params["guidance_scale"], max_new_tokens=new_tokens,
        )
        audio = self.model.generate(
            **inputs,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList(
                [_SeededSampler(params["guidance_scale"], self.sampling, params["seed"])]
            ),
            stopping_criteria=StoppingCriteriaList([_TokenProgress(tracker)]),
        )
        # (batch, channels, samples); stereo checkpoints are mixed down: the encoder is mono.
        samples = audio[0].float().mean(dim=0).cpu().numpy().astype(np.float32)
        samples = samples[: round(params["duration"] * self.sample_rate)]
        fmt = params["response_format"]
        data = encode_audio(samples, self.sample_rate, fmt, rate=self.sample_rate)
        tracker.finish()
        return MediaResult(
            data=data,
            media_type=MEDIA_TYPES[fmt],
            suffix=f".{fmt}",
            metadata={
                "format": fmt,
                "duration_s": samples.size / self.sample_rate,
                "requested_duration_s": params["duration"],
                "sample_rate": self.sample_rate,
                "channels": 1,
                "seed": params["seed"],
                "guidance_scale": params["guidance_scale"],
                "tokens": new_tokens,
            },
        )
