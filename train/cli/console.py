"""What the console scripts print: each log line once, and none of the libraries' notes that a
user of this project cannot act on (they buried the lines that matter)."""

from __future__ import annotations

import logging
import re
import warnings

# Warnings about the libraries' own internals or about choices this project makes on purpose,
# as (category, start of the message). Everything else still shows.
NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # diffusers, with the scheduler's whole config as JSON: steps_offset=0 is the schedule the
    # models here are trained with, not a stale file to fix.
    (FutureWarning, r"The configuration file of this scheduler"),
    # Lightning's own use of a deprecated torch pytree API.
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # The data module's validation loaders are an empty list when no val_urls are set: on
    # purpose. An empty DataLoader (a real mistake) names `DataLoader` and still shows.
    (Warning, r"Total length of `list` across ranks is zero"),
)
# Log records of the same kind, as (logger, regular expression the message starts with).
NOISE_RECORDS: tuple[tuple[str, str], ...] = (
    # Lightning's adverts for its cloud services.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
    # train.callbacks.console.CompactModelSummary replaces Lightning's, as configured.
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary"),
    # The PIL image processors stand in for the torchvision ones; nothing here uses either.
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision"),
)
# What diffusers and transformers say about a prompt longer than the tokenizer reads: it names
# CLIP whatever the encoder is and echoes the prompt;
# train.models.conditioners.text.long_prompts_note says it once.
TRUNCATION_RECORDS: tuple[tuple[str, str], ...] = (
    ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
     "The following part of your input was truncated"),
    ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma",
     "The following part of your input was truncated"),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer"),
)  # fmt: skip


# What loading an export through diffusers says that a user of ldm-sample / ldm-eval cannot act
# on: accelerate is optional (a tiny export loads in a second without it), and our exports pair
# the pipeline with the text encoder they were trained with (MiniLM is a BertModel), where
# diffusers' type hint names CLIP. Another mismatch still shows.
LOADING_RECORDS: tuple[tuple[str, str], ...] = (
    ("diffusers.pipelines.pipeline_utils", "Cannot initialize model with low cpu memory usage"),
    ("diffusers.models.modeling_utils", "Cannot initialize model with low cpu memory usage"),
    ("diffusers.pipelines.pipeline_utils",
     r"Expected types for text_encoder: \(<class '[\w.]+(CLIPTextModel|T5EncoderModel)'>,\), "
     r"got <class "
     r"'transformers\.models\.bert\.modeling_bert\.BertModel'>"),
)  # fmt: skip


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._regex.match(str(record.msg))


def drop_records(records: tuple[tuple[str, str], ...]) -> None:
    """Filter out the records of these loggers whose message starts with the pattern (a regular
    expression); idempotent. A logger's filters see only the records logged on that very
    logger, hence one filter per named logger."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, pattern in records:
        by_logger[name] = (*by_logger.get(name, ()), pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        known = {p for f in logger.filters if isinstance(f, _DropMatching) for p in f.patterns}
        new = tuple(p for p in patterns if p not in known)
        if new:
            logger.addFilter(_DropMatching(new))


def quiet_library_noise() -> None:
    """Silence the warnings and log records listed above. Imports nothing: the first come while
    the config checks import the model classes."""
    for category, message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    drop_records(NOISE_RECORDS + TRUNCATION_RECORDS)


def tidy_console() -> None:
    """Each log line once, and no transformers loading/saving bars (a second for a text
    encoder; lines of escape codes in a log file). Imports Lightning and transformers (the run
    imports them next anyway).

    Lightning's package import gives the `lightning` logger a console handler of its own while
    its records also propagate to the root logger, where Hydra's job logging has a console
    handler (and the run's log file): every INFO line came twice. Hydra's stays."""
    import lightning  # noqa: F401 - the import adds the handler
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not logging.getLogger().handlers:  # not under Hydra: Lightning's handler is the only one
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a console, not a log file
                logger.removeHandler(handler)
        logger.propagate = True


def quiet_loading() -> None:
    """For the scripts that load an export: the notes above, and no loading bars (diffusers'
    components, transformers' weights: a second, drawn as lines of escape codes in logs)."""
    import diffusers
    import transformers

    quiet_library_noise()
    drop_records(LOADING_RECORDS)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
