"""One console configuration for every entry point: fedrad's own lines, third-party chatter off.

Flower's strategy banners and per-call lines, Lightning's accelerator and tip lines, Ray's
duplicated worker logs and deprecation warnings from libraries fedrad does not call directly
are hidden unless ``verbose=true``; warnings and errors always show.
"""

from __future__ import annotations

import logging
import warnings

THIRD_PARTY_LOGGERS = (
    "flwr",
    "pytorch_lightning",
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "ray",
    "alembic",
    "sqlalchemy",
    "optuna",
    "httpx",
)
NOISY_WARNINGS = (".*declarative_base.*", ".*LeafSpec.*", ".*DEPRECATED FEATURE.*")


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors add their level. Plain text: no colour codes."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname} "
        self._style._fmt = f"%(asctime)s {level}%(message)s"
        return super().format(record)


class _DropDeprecationBanners(logging.Filter):
    """Flower logs its own API deprecations (e.g. of ``run_simulation``) as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def quiet_third_party(verbose: bool = False) -> None:
    """Third-party loggers at WARNING (INFO with ``verbose``) and known noise filtered out.

    Call it after the libraries are imported: Lightning sets its own logger level on import."""
    level = logging.INFO if verbose else logging.WARNING
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbose:
        return
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _DropDeprecationBanners) for f in flower.filters):
        flower.addFilter(_DropDeprecationBanners())
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def reach_the_console(logger: logging.Logger) -> None:
    """Print ``logger``'s INFO lines in fedrad's console format where logging is not set up to
    show them (a simulated site's Ray worker, whose output reaches the console with
    ``verbose=true``); an entry point's own logging set-up is left alone."""
    if logger.isEnabledFor(logging.INFO):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler would print each line a second time
