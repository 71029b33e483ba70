"""What every command-line entry point shares: its own ``--help``, answered before torch loads,
and user errors as one line.

The Hydra entry points take ``key=value`` overrides; Hydra's generated help is a dump of the
whole configuration. :func:`answer_help` prints the script's own docstring instead (what it
does, for whom, its required options, an example) and how to see the full configuration, and
exits, so ``--help`` answers in well under a second. ``--hydra-help`` still shows Hydra's own.
The argparse entry points (the benchmarks, the demo tools) call :func:`answer_argparse_help`
before their heavy imports for the same reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_CONFIG = """\
Options are Hydra overrides (key=value; +key=value adds a key). To see more:
  python {script} --cfg job          the full configuration this command would run with
  python {script} --hydra-help       Hydra's own options (multirun, output folders, ...)
  docs/reference/configuration.md    every config group and key, with defaults"""


def answer_help(doc: str | None, argv: list[str] | None = None) -> None:
    """Print ``doc`` and the full-configuration hint, then exit, when ``-h``/``--help`` is asked."""
    argv = sys.argv if argv is None else argv
    if not {"-h", "--help"} & set(argv[1:]):
        return
    script = Path(argv[0]).as_posix()
    if "scripts/" in script:
        script = "scripts/" + script.split("scripts/", 1)[1]
    print((doc or "").strip())
    print()
    print(FULL_CONFIG.format(script=script))
    raise SystemExit(0)


def answer_argparse_help(parse_args: Callable[[], object], argv: list[str] | None = None) -> None:
    """Run an argparse entry point's parser at once when ``-h``/``--help`` is asked (argparse
    prints the help and exits), so that the script answers before it imports its heavy modules."""
    argv = sys.argv if argv is None else argv
    if {"-h", "--help"} & set(argv[1:]):
        parse_args()


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark script's parser: its docstring's first three paragraphs as the help, and
    where to read the rest."""
    return argparse.ArgumentParser(
        description="\n\n".join((doc or "").split("\n\n")[:3]),
        epilog="What is measured and how: the docstring of this file. Recorded figures: docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# Errors whose message names the file, key or value at fault: a user sees that one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, OSError)


@contextmanager
def one_line_errors(verbose: bool = False, *also: type[BaseException]) -> Iterator[None]:
    """Turn a user error (:data:`USER_ERRORS` and ``also``) into one line on stderr,
    ``<script>: <message>``, and exit status 2; ``verbose`` keeps the traceback."""
    try:
        yield
    except (*USER_ERRORS, *also) as error:
        if verbose:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
