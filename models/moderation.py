"""Text moderation: classifiers whose labels map onto OpenAI's moderation categories.

Registry options shared by both adapters (`ModerationOptions`, engine/contracts/ranking.py):
- `label_map`: classifier label → an OpenAI category, or a list of them (a category several
  labels map onto takes the highest score). Unmapped labels are ignored.
- `thresholds`: category → score at or above which it is flagged (0.5 where not given).
Categories no label maps onto score 0.0 and are never flagged (engine/ranking/service.py).

The contract engine/ranking/service.py drives: `prepare(texts)` on the request path (tokenize, check
limits) → batch items; `size_of(item)`; `batch(items)` on the compute thread → one
{category: score} per item; `thresholds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from engine.contracts.base import AdapterOptions
from engine.contracts.ranking import (
    MODERATION_CATEGORIES,
    ModerationOptions,
    TransformersModerationOptions,
)
from engine.core.errors import ContextLengthExceededError, ModelLoadError
from engine.core.sources import resolve_source
from models.base import ModelAdapter
from models.sequence import Encoded, EncoderInputs, token_limit

DEFAULT_THRESHOLD = 0.5


class ModerationAdapter(ModelAdapter):
    """A `Moderator` (engine/contracts/ranking.py)."""

    options_model: ClassVar[type[AdapterOptions]] = ModerationOptions
    options: ModerationOptions
    thresholds: dict[str, float]

    def _map_labels(self, labels: list[str], default_map: dict[str, Any]) -> None:
        """Checks `label_map` and `thresholds` against the classifier's labels and the
        categories, so a wrong entry fails at load with the reason rather than on every
        request."""
        options = self.options
        label_map = default_map if options.label_map is None else options.label_map
        self._columns: list[tuple[int, str]] = []  # (label's output column, category)
        for label, targets in label_map.items():
            if label not in labels:
                raise ModelLoadError(
                    f"{self.entry.id!r}: label_map names {label!r}, which the classifier does "
                    f"not have (its labels: {', '.join(labels)})"
                )
            for category in [targets] if isinstance(targets, str) else targets:
                self._check_category(category, "label_map")
                self._columns.append((labels.index(label), category))
        if not self._columns:
            raise ModelLoadError(
                f"{self.entry.id!r}: none of its labels ({', '.join(labels)}) maps onto a "
                "moderation category; set options.label_map"
            )
        thresholds = options.thresholds
        for category, value in thresholds.items():
            self._check_category(category, "thresholds")
            if not 0 <= value <= 1:
                raise ModelLoadError(
                    f"{self.entry.id!r}: threshold of {category!r} must be between 0 and 1"
                )
        self.thresholds = {c: float(thresholds.get(c, DEFAULT_THRESHOLD))
                           for c in MODERATION_CATEGORIES}

    def _check_category(self, category: Any, option: str) -> None:
        if category not in MODERATION_CATEGORIES:
            raise ModelLoadError(
                f"{self.entry.id!r}: {option} names {category!r}, which is not a moderation "
                f"category ({', '.join(MODERATION_CATEGORIES)})"
            )

    def _category_scores(self, probabilities: np.ndarray) -> list[dict[str, float]]:
        """(texts, labels) probabilities → one {category: score} per text."""
        results = []
        for row in probabilities:
            scores: dict[str, float] = {}
            for column, category in self._columns:
                scores[category] = max(scores.get(category, 0.0), float(row[column]))
            results.append(scores)
        return results


# -- alt-profanity-check ------------------------------------------------------------------------

# Every class the package's two joblib files are built from (alt-profanity-check 1.9.1). They
# are pickles; ember never unpickles anything else: any other name in them refuses the load.
_TRUSTED_GLOBALS = frozenset({
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy", "float64"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("sklearn.calibration", "CalibratedClassifierCV"),
    ("sklearn.calibration", "_CalibratedClassifier"),
    ("sklearn.calibration", "_SigmoidCalibration"),
    ("sklearn.svm._classes", "LinearSVC"),
    ("sklearn.feature_extraction.text", "TfidfVectorizer"),
    ("sklearn.feature_extraction.text", "TfidfTransformer"),
})


def load_trusted_joblib(path: Path) -> Any:
    """joblib.load with an allow-list: the unpickler resolves only `_TRUSTED_GLOBALS` (joblib
    routes the nested pickles of object arrays through the same check), so a tampered file
    cannot name a function to call."""
    from joblib.numpy_pickle import NumpyUnpickler

    class TrustedUnpickler(NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _TRUSTED_GLOBALS:
                raise ModelLoadError(
                    f"{path} refers to {module}.{name}, which is not a trusted type; refusing "
                    "to unpickle it"
                )
            return super().find_class(module, name)

    with path.open("rb") as handle:
        return TrustedUnpickler(str(path), handle, True).load()


class ProfanityCheckModeration(ModerationAdapter):
    """alt-profanity-check: a TF-IDF + calibrated linear SVM (scikit-learn) that scores abusive
    and profane language. One probability; by default it maps onto `harassment` only."""

    def load(self) -> None:
        folder = Path(resolve_source(self.entry))
        files = [folder / "vectorizer.joblib", folder / "model.joblib"]
        try:
            self._vectorizer = load_trusted_joblib(files[0])
            self.model = load_trusted_joblib(files[1])
        except (OSError, EOFError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {folder}: {exc}") from exc
        if list(getattr(self.model, "classes_", [])) != [0, 1]:
            raise ModelLoadError(f"{self.entry.id!r}: {files[1]} is not a binary classifier")
        self._bytes = sum(path.stat().st_size for path in files)
        self._map_labels(["profanity"], {"profanity": "harassment"})

    def warmup(self) -> None:
        self.batch(["warm up"])

    def memory_bytes(self) -> int:
        return self._bytes  # not torch modules; about the size of the files

    @staticmethod
    def prepare(texts: list[str]) -> list[str]:
        return list(texts)

    @staticmethod
    def size_of(text: str) -> int:
        return len(text)

    def batch(self, texts: list[str]) -> list[dict[str, float]]:
        probabilities = self.model.predict_proba(self._vectorizer.transform(texts))
        return self._category_scores(probabilities[:, 1:])


# -- transformers --------------------------------------------------------------------------------


class TransformersModeration(ModerationAdapter):
    """Any transformers sequence-classification checkpoint (e.g. unitary/toxic-bert). Scores
    are sigmoids of the logits (multi-label heads) unless `options.activation` is `softmax`
    or the config's `problem_type` is single-label. Without `label_map`, labels that are
    OpenAI category names map onto themselves."""

    options_model: ClassVar[type[AdapterOptions]] = TransformersModerationOptions
    options: TransformersModerationOptions

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_source(self.entry)
        tokenizer = self.pretrained(AutoTokenizer.from_pretrained, path)
        self.model = self.pretrained(AutoModelForSequenceClassification.from_pretrained, path,
                                     dtype=self.context.dtype, use_safetensors=True)
        self.model.to(self.context.device).eval()
        config = self.model.config
        self._inputs = EncoderInputs(tokenizer)
        self.max_tokens = token_limit(tokenizer, config, self.entry.limits.context_length)
        single_label = config.problem_type == "single_label_classification"
        self._activation = self.options.activation or (
            "softmax" if single_label else "sigmoid")
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self._map_labels(labels, {label: label for label in labels
                                  if label in MODERATION_CATEGORIES})

    def warmup(self) -> None:
        self.batch(self.prepare(["warm up"]))

    def prepare(self, texts: list[str]) -> list[Encoded]:
        items = [self._inputs.encode(text) for text in texts]
        for index, item in enumerate(items):
            if len(item) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] has {len(item)} tokens; {self.entry.id!r} accepts at most "
                    f"{self.max_tokens} tokens per input.",
                    param=f"input[{index}]",
                )
        return items

    @staticmethod
    def size_of(item: Encoded) -> int:
        return len(item)

    @torch.inference_mode()
    def batch(self, items: list[Encoded]) -> list[dict[str, float]]:
        features = self._inputs.collate(items, self.model.device)
        logits = self.model(**features).logits.float()
        if self._activation == "softmax":
            probabilities = torch.softmax(logits, dim=-1)
        else:
            probabilities = torch.sigmoid(logits)
        return self._category_scores(probabilities.cpu().numpy())
