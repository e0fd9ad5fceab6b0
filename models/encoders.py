"""Where an encoder's forward pass runs, for embeddings and bi-encoder rerankers alike: torch
in fp32, torch in bf16 (GPUs, and CPUs with AVX512-BF16 or AMX), or ONNX Runtime in fp32 or
int8 (dynamically quantized for the CPU it runs on).

An ONNX variant is exported once per checkpoint into the model cache
(`models_dir/onnx/<entry>-<fingerprint>/`) and checked against fp32 torch on a fixed probe
set: a variant whose lowest cosine falls below the entry's `min_cosine` is refused, with a log
line, and the next one is tried, down to fp32 torch, which always serves. `auto` tries the
variants that pass on this hardware and keeps the fastest on the probe batch. What was chosen
and why is the `note` shown in /v1/models; the checks are cached next to the export.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from engine.core.errors import ModelLoadError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "bf16", "onnx", "onnx-int8")
# Sentences of different lengths, topics and registers: what a quantized model gets wrong
# shows on some of them. Fixed, so a cached check stays valid.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "I love pizza.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "The weather is lovely today; let's walk along the river and have lunch outside.",
    "Paris is the capital of France.",
    "Error 504: the upstream server did not answer in time.",
    "def add(a, b):\n    return a + b",
    "Der Hund schläft im Garten.",
    "A man is playing a guitar on stage in front of a large crowd.",
    "refund policy",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
    "oxygen as a by-product; it takes place mainly in the chloroplasts of leaf cells.",
    "What time does the pharmacy close on Sundays?",
    "The committee postponed its decision until more data on the side effects is available.",
    "ok",
)
PROBE_ROUNDS = 3  # timing rounds per variant under `auto` (the median counts)


class Encoder(Protocol):
    """One forward pass: token ids, mask and (pairs) segment ids (int64, batch x length) to
    the model's first output as float32: last hidden states, or a classifier's logits."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None) -> np.ndarray: ...


class TorchEncoder:
    def __init__(self, module: torch.nn.Module, device: str):
        self.module, self.device = module, device

    @torch.no_grad()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None) -> np.ndarray:
        extra = ({} if token_type_ids is None else
                 {"token_type_ids": torch.from_numpy(token_type_ids).to(self.device)})
        output = self.module(input_ids=torch.from_numpy(input_ids).to(self.device),
                             attention_mask=torch.from_numpy(attention_mask).to(self.device),
                             **extra)
        hidden: torch.Tensor = output[0]
        return hidden.float().cpu().numpy()


class OnnxEncoder:
    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, every core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle pool threads sleep rather than spin: the event loop and the other models
        # share these cores (spinning cost the HTTP side its CPU).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = (np.zeros_like(input_ids) if token_type_ids is None
                                       else token_type_ids)
        output: np.ndarray = self.session.run(None, feeds)[0]
        return output


def bf16_problem(device: str) -> str | None:
    """None when bf16 matrix math is native here, else why not (emulated bf16 is slower than
    fp32 on a CPU without it)."""
    if device.startswith("cuda"):
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "the CPU's instruction sets cannot be read (/proc/cpuinfo)"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    return "this CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated (slower)"


def onnx_problem(device: str) -> str | None:
    if not device.startswith("cpu"):
        return "ONNX Runtime serves the CPU here; on a GPU torch is used"
    try:
        import onnx  # noqa: F401  (the exporter and quantizer need it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"ONNX export needs the onnx and onnxruntime packages: {exc}"
    return None


def export_onnx(module: torch.nn.Module, folder: Path, pairs: bool = False) -> Path:
    """The module as ONNX with dynamic batch and length, written atomically; reused when it
    exists. An encoder takes input_ids and attention_mask and gives hidden states; with
    `pairs`, a cross-encoder, it also takes token_type_ids and gives one row of logits per
    pair."""
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"model.onnx.{os.getpid()}.partial"  # servers may export at once
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "length"}

    class Forward(torch.nn.Module):  # positional inputs, first output only
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    *token_type_ids: torch.Tensor) -> Any:
            extra = {"token_type_ids": token_type_ids[0]} if token_type_ids else {}
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]

    names = ["input_ids", "attention_mask", *(["token_type_ids"] if pairs else [])]
    torch.onnx.export(
        Forward(module).eval(), tuple(torch.ones_like(ids) for _ in names), str(staging),
        input_names=names, output_names=["output"],
        dynamic_axes={**{name: axes for name in names},
                      "output": {0: "batch"} if pairs else axes},
        opset_version=17, dynamo=False,
    )
    staging.replace(path)
    return path


def quantize_int8(source: Path) -> Path:
    """Weights of every MatMul as int8, activations quantized on the fly (dynamic
    quantization: no calibration data), for the CPU's own instruction set."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = source.with_name("model-int8.onnx")
    if path.exists():
        return path
    staging = source.with_name(f"model-int8.onnx.{os.getpid()}.partial")
    quantize_dynamic(str(source), str(staging), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    staging.replace(path)
    return path


@dataclass(frozen=True)
class VariantCheck:
    backend: str
    min_cosine: float | None = None  # vs fp32 torch on PROBE_TEXTS
    seconds: float | None = None  # median probe batch
    problem: str | None = None  # why it cannot serve (hardware, export failure, cosine)


@dataclass(frozen=True)
class EncoderChoice:
    backend: str
    encoder: Encoder | None  # None: the checkpoint's own torch module serves (fp32 torch)
    note: str


def _min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return float(((vectors * reference).sum(axis=1) / np.maximum(norms, 1e-12)).min())


def _median_seconds(run: Callable[[], Any]) -> float:
    times = []
    for _ in range(PROBE_ROUNDS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def choose_encoder(
    *, entry_id: str, requested: str, min_cosine: float, device: str, threads: int,
    cache: Path, module: Callable[[], torch.nn.Module],
    embed: Callable[[Encoder | None], np.ndarray], pairs: bool = False,
) -> EncoderChoice:
    """The backend that serves, by `requested` (a BACKENDS name or `auto`).

    `module()` gives the encoder module to export or run in bf16 (built only when needed);
    `embed(encoder)` returns the probe set's final vectors through `encoder` (None: fp32
    torch, the reference): sentence vectors, or for a cross-encoder (`pairs`) each probe
    pair's scores as a row, compared as one vector of all of them. A variant that cannot
    serve falls back, logged, to fp32 torch."""
    if requested not in (*BACKENDS, "auto"):
        raise ModelLoadError(f"{entry_id!r}: backend must be auto or one of "
                             f"{', '.join(BACKENDS)}; got {requested!r}")
    if requested == "torch":
        return EncoderChoice("torch", None, "fp32 torch (the entry's choice)")
    key = {"requested": requested, "min_cosine": min_cosine, "device": device}
    if (cached := _cached_choice(cache, key, threads)) is not None:
        log.info("%s: serving on %s (%s)", entry_id, cached.backend, cached.note)
        return cached
    candidates = [requested] if requested != "auto" else (
        ["onnx-int8", "bf16", "onnx"] if device.startswith("cpu") else ["bf16"])
    reference = embed(None)
    baseline = _median_seconds(lambda: embed(None)) if requested == "auto" else None
    checks: list[VariantCheck] = []
    built: dict[str, Encoder] = {}
    for backend in candidates:
        check, encoder = _check_variant(backend, min_cosine, device, threads, cache, module,
                                        embed, reference, requested == "auto", pairs)
        checks.append(check)
        if encoder is not None:
            built[backend] = encoder
        if check.problem:
            log.warning("%s: not serving on %s: %s", entry_id, backend, check.problem)
    passing = [c for c in checks if c.problem is None]
    if not passing:
        reasons = "; ".join(f"{c.backend}: {c.problem}" for c in checks)
        log.warning("%s: serving on fp32 torch (%s)", entry_id, reasons)
        choice = EncoderChoice("torch", None, f"fp32 torch; {reasons}")
    else:
        best = min(passing, key=lambda c: c.seconds or 0.0)
        speed = (f", {baseline / best.seconds:.2f}x fp32 torch on the probe batch"
                 if baseline and best.seconds else "")
        note = (f"min cosine {best.min_cosine:.4f} vs fp32 on {len(PROBE_TEXTS)} probe "
                f"texts{speed}")
        log.info("%s: serving on %s (%s)", entry_id, best.backend, note)
        choice = EncoderChoice(best.backend, built[best.backend], note)
    _record(cache, key, checks, baseline, choice)
    return choice


def _check_variant(
    backend: str, min_cosine: float, device: str, threads: int, cache: Path,
    module: Callable[[], torch.nn.Module], embed: Callable[[Encoder | None], np.ndarray],
    reference: np.ndarray, timed: bool, pairs: bool,
) -> tuple[VariantCheck, Encoder | None]:
    problem = bf16_problem(device) if backend == "bf16" else onnx_problem(device)
    if problem:
        return VariantCheck(backend, problem=problem), None
    try:
        encoder: Encoder
        if backend == "bf16":  # a copy: the fp32 module stays the reference
            encoder = TorchEncoder(copy.deepcopy(module()).to(torch.bfloat16), device)
        else:
            path = export_onnx(module(), cache, pairs)
            if backend == "onnx-int8":
                path = quantize_int8(path)
            encoder = OnnxEncoder(path, threads)
        found = embed(encoder)
        # A cross-encoder's scores are one vector over the probe pairs (each pair one value).
        cosine = (_min_cosine(found.reshape(1, -1), reference.reshape(1, -1)) if pairs
                  else _min_cosine(found, reference))
    except Exception as exc:  # a failed export or session falls back; the model still serves
        return VariantCheck(backend, problem=f"{type(exc).__name__}: {exc}"), None
    if cosine < min_cosine:
        return VariantCheck(backend, cosine, problem=(
            f"min cosine {cosine:.4f} vs fp32 on the probe texts is below the entry's "
            f"min_cosine {min_cosine}")), None
    seconds = _median_seconds(lambda: embed(encoder)) if timed else None
    return VariantCheck(backend, cosine, seconds), encoder


def _record(cache: Path, key: dict[str, Any], checks: Sequence[VariantCheck],
            baseline: float | None, choice: EncoderChoice) -> None:
    """What was checked and chosen, next to the exports: the next load with the same request
    serves the same variant without checking again (a fallback is checked again)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "checks.json").write_text(json.dumps({
            **key, "backend": choice.backend, "note": choice.note,
            "fp32_torch_seconds": baseline, "variants": [asdict(c) for c in checks],
        }, indent=2))
    except OSError as exc:
        log.warning("cannot write %s: %s", cache / "checks.json", exc)


def _cached_choice(cache: Path, key: dict[str, Any], threads: int) -> EncoderChoice | None:
    try:
        record = json.loads((cache / "checks.json").read_text())
    except (OSError, ValueError):
        return None
    if any(record.get(name) != value for name, value in key.items()):
        return None
    backend, note = record.get("backend"), f"{record.get('note')}; checked at export"
    try:
        if backend == "onnx":
            return EncoderChoice("onnx", OnnxEncoder(cache / "model.onnx", threads), note)
        if backend == "onnx-int8":
            return EncoderChoice("onnx-int8", OnnxEncoder(cache / "model-int8.onnx", threads),
                                 note)
    except Exception as exc:  # a file gone or damaged: check again
        log.warning("cached %s export in %s cannot be used (%s); checking again", backend,
                    cache, exc)
    return None  # bf16 and fallbacks are cheap to check again
