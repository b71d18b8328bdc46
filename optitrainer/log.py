"""optitrainer's log lines follow transformers' verbosity, so that a training script's log says what ran."""

from __future__ import annotations

import logging

LOGGER_NAME = "optitrainer"
#: the level optitrainer last gave the logger: any other level was set by someone else, and stays
_LEVEL_SET = "_optitrainer_level_from_transformers"


def follow_transformers_verbosity() -> None:
    """Give the ``optitrainer`` logger transformers' verbosity, unless someone set a level on it.

    A script sets transformers' verbosity (``transformers.logging.set_verbosity_info()``, or the Trainer
    from ``log_level``), not optitrainer's; without this the lines that say which optimizer, distribution
    and engine ran would stay below the root logger's WARNING. Where no handler would print them (the
    root logger has none), they go through transformers' own handler, as transformers' lines do.
    """
    import transformers

    logger = logging.getLogger(LOGGER_NAME)
    if logger.level not in (logging.NOTSET, getattr(logger, _LEVEL_SET, None)):
        return  # someone chose optitrainer's level
    level = transformers.logging.get_verbosity()
    logger.setLevel(level)
    setattr(logger, _LEVEL_SET, level)
    if not logging.getLogger().handlers and not logger.handlers:
        for handler in logging.getLogger("transformers").handlers:
            logger.addHandler(handler)
