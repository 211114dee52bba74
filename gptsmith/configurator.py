"""Command-line configuration shared by every entry point.

    python train.py [CONFIG.py ...] [--key=value ...]

Config files are plain Python that assign names; later files and --key=value
overrides win. Values are parsed with ast.literal_eval (falling back to the raw
string) and checked against the type of the dataclass field they set.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import difflib
import faulthandler
import gc
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix; entry points print it as one `error:` line and exit 2."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a one-line meaning for --help."""
    return dataclasses.field(default=default, metadata={"help": help})


def show_progress() -> bool:
    """Progress bars only for a person at a terminal: not under CI, not into a log file."""
    return not os.environ.get("CI") and sys.stderr.isatty()


@contextmanager
def cli_errors() -> Iterator[None]:
    """What every command does around its body: UserError (and Ctrl-C outside training) becomes one
    line on stderr and an exit code, and the garbage collector leaves long-lived objects alone.

    A process killed by a fatal signal (a native crash, an abort) prints where each thread was
    first: under torchrun that names the rank's failing line, not just its exit code."""
    if not faulthandler.is_enabled():  # (pytest enables its own)
        faulthandler.enable(all_threads=True)
    # The modules imported so far live as long as the process; frozen, they are left out of the
    # full collections that importing torch._dynamo (the first optimizer does) sets off. And at
    # exit Python's last collection would walk every object still alive (~280k with torch and
    # torch._dynamo) to free memory the OS takes back anyway. Together 0.6-1.0 s of a command on
    # a 2-vCPU machine. Frozen objects are still freed by reference counting as modules are
    # cleared; only their cycles wait for an unfreeze.
    gc.freeze()
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        gc.unfreeze()  # a command called in-process (tests) leaves its garbage collectable


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return f"{_type_name(args[0])} or None"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check value against a field type; an int is accepted for a float, a number for a str."""
    declared, args = tp, typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool and isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    expected = "True or False" if declared is bool else _type_name(declared)
    raise UserError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for the keys"
    return UserError(f"unknown config key '{key}'{where}{hint}")


def parse_value(raw: str, tp: Any) -> Any:
    """A --key=value string: a Python literal if it parses, else the raw string.
    A str field keeps the raw text when it parses as something else (--out_dir=2024)."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    accepts_str = tp is str or str in typing.get_args(tp)
    if accepts_str and not isinstance(value, str) and not (value is None and type(None) in typing.get_args(tp)):
        return raw
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """Run a config file in its own namespace and return the names it assigns."""
    p = Path(path)
    if not p.is_file():
        siblings = [c.name for c in p.parent.glob("*.py")] if p.parent.is_dir() else []
        close = difflib.get_close_matches(p.name, siblings, n=1)
        hint = f"; did you mean {p.parent / close[0]}?" if close else ""
        raise UserError(f"config file {path} not found{hint}")
    try:
        source = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    try:
        code = compile(source, str(p), "exec")
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    namespace: dict[str, Any] = {}
    try:
        exec(code, namespace)
    except Exception as e:
        line = next((fs.lineno for fs in reversed(traceback.extract_tb(e.__traceback__)) if fs.filename == str(p)), "?")
        raise UserError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def read_overrides(cls: type, argv: list[str]) -> dict[str, Any]:
    """Parse argv into {key: value} for the keys the user set explicitly, type-checked."""
    types_ = _field_types(cls)
    known = list(types_)
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cls))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"expected --key=value, got '{arg}'")
            if key not in types_:
                raise _unknown_key(key, known, "")
            values[key] = coerce(key, parse_value(raw, types_[key]), types_[key])
        elif arg.endswith(".py") or Path(arg).is_file():
            for key, value in read_config_file(arg).items():
                if key not in types_:
                    raise _unknown_key(key, known, f" in {arg}")
                values[key] = coerce(key, value, types_[key])
        else:
            raise UserError(f"'{arg}' is neither a config file nor --key=value")
    return values


def load_config(cls: Callable[..., T], argv: list[str] | None = None) -> T:
    """The typed config for argv (sys.argv[1:] by default): defaults, then files, then overrides."""
    argv = sys.argv[1:] if argv is None else argv
    return cls(**read_overrides(cls, argv))


def program_name() -> str:
    """How the user started this command: 'python train.py', 'gptsmith-train', ..."""
    name = Path(sys.argv[0]).name
    if name == "__main__.py":
        return f"python -m {Path(sys.argv[0]).parent.name}"
    return f"python {name}" if name.endswith(".py") else name


def help_text(cls: type) -> str:
    """Every key with its type, default and one-line meaning."""
    lines = [(cls.__doc__ or "").strip(), "", f"usage: {program_name()} [CONFIG.py ...] [--key=value ...]", ""]
    types_ = _field_types(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    width = max(len(f.name) for f in fields)
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(
            f"  --{f.name:<{width}}  {f.metadata.get('help', '')} [{_type_name(types_[f.name])}, default {default!r}]"
        )
    return "\n".join(lines)
