"""The offsite-tuning workflow: data, distillation, adapter fine-tuning, evaluation, reports."""

from .data import ChoiceItem, DataError, TextBlocks, check_tokenizer, load_blocks, load_choices, read_texts
from .distill import distill, kd_loss
from .evaluate import multiple_choice, perplexity
from .finetune import finetune
from .loop import TrainResult, TrainSettings
from .methods import METHODS, LoraSettings

__all__ = [
    "METHODS",
    "ChoiceItem",
    "DataError",
    "LoraSettings",
    "TextBlocks",
    "TrainResult",
    "TrainSettings",
    "check_tokenizer",
    "distill",
    "finetune",
    "kd_loss",
    "load_blocks",
    "load_choices",
    "multiple_choice",
    "perplexity",
    "read_texts",
]
