"""The `soup` command line: parses options, calls the Python API, prints one-line errors.

Every subcommand lives in a module of this package and registers itself on `app`. The
library raises `SoupError`s; only `main` turns them into `soup: error: ...` and exit code 1
(a usage error is one such line too, with exit code 2; Ctrl-C or SIGTERM removes
temporaries, says so and exits 130).
`--debug` anywhere on the line shows tracebacks.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any, NoReturn

from ..errors import SoupError
from . import core, demo, greedy, integrations, stock, sweeps
from . import evaluate as evaluate_cli
from . import learned as learned_cli
from . import report as report_cli
from . import run as run_cli
from .common import STATE
from .root import app, command
from .supervise import interrupt_once, supervised

for module in (
    core,
    evaluate_cli,
    learned_cli,
    greedy,
    sweeps,
    stock,
    run_cli,
    report_cli,
    integrations,
    demo,
):
    module.register(app)


MAX_LINE = 500  # characters: a 10⁷-element value or a long path must not flood stderr


def one_line(message: str) -> str:
    """`message` on one line (newlines and other control characters, e.g. in a hostile file
    name, shown escaped) and at most MAX_LINE characters."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[: MAX_LINE * 4])
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `soup` console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--debug", "--quiet", "-q"):  # global flags are accepted anywhere
        if flag in args:
            args.remove(flag)
            STATE["debug" if flag == "--debug" else "quiet"] = True
    # SIGTERM cleans up temporaries like Ctrl-C does (KeyboardInterrupt); handlers restored
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, interrupt_once)
    try:
        code = _invoke(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except SoupError as e:
        if STATE["debug"]:
            raise
        print(one_line(f"soup: error: {e}"), file=sys.stderr)
        return 1
    except OSError as e:  # a file problem no check above foresaw: still one line
        if STATE["debug"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(one_line(f"soup: error: {where}{e.strerror or e}"), file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, and --debug shows the traceback
        if STATE["debug"]:
            raise
        print(one_line(f"soup: error: internal error ({type(e).__name__}: {e}); rerun with "
                       "--debug for the traceback and report it"), file=sys.stderr)  # fmt: skip
        return 1
    finally:
        STATE.update(quiet=False, debug=False)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if code == 130:
        print("soup: interrupted; temporary files were removed", file=sys.stderr)
    return code


def _invoke(args: list[str]) -> int:
    """Run the click group on args and return its exit code. Typer turns Ctrl-C into exit
    130. A usage error (an option value of the wrong type, an unknown option or command, a
    missing argument) is one line naming the option, exit code 2 as in click; `soup` alone
    prints the help (exit 2, as click does). Our own errors pass through to `main`."""
    errors = _click_errors()
    try:
        rv = command().main(args=args, prog_name="soup", standalone_mode=False)
    except errors.ClickException as e:
        message = e.format_message()
        if type(e).__name__ == "NoArgsIsHelpError":
            if message.strip():  # typer has printed the help already; click has not
                print(message, file=sys.stderr)
            return int(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(one_line(f"soup: error: {message}{hint}"), file=sys.stderr)
        return int(e.exit_code)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def _click_errors() -> Any:
    """The exceptions of the click that typer runs on: its own copy in newer typers."""
    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:  # typer before its copy of click
        return importlib.import_module("click.exceptions")


def run() -> NoReturn:
    """The `soup` console script: `main` in a supervised child process (see supervise.py)."""
    sys.exit(supervised(main))
