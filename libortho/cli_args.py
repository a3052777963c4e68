"""Checks on what the user passes the `libortho` command line: argparse value types, and the text
files it reads. Kept apart from cli.py so that subcommand modules (serve) can share them without
importing the whole command line. Every failure is one line for the user, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from . import jsontext
from typing import TypeVar

Number = TypeVar("Number", int, float)


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


# ---- argparse value types --------------------------------------------------------------------
def number(kind: Callable[[str], Number], low: float, high: float, not_a_number: str,
           out_of_range: str) -> Callable[[str], Number]:
    """An argparse type: `kind(text)`, accepted when it lies in [low, high] (NaN never does).

    The messages are format strings: `not_a_number` gets `text` (what the user typed),
    `out_of_range` gets `value` (what it parsed to)."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:  # also an integer of more digits than Python converts (4300)
            raise argparse.ArgumentTypeError(not_a_number.format(text=_shortened(text))) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(out_of_range.format(value=_shortened(str(value))))
        return value

    return parse


def _shortened(text: str, keep: int = 24) -> str:
    """A value as typed, cut in the middle when long, so an error stays one readable line."""
    return text if len(text) <= 2 * keep else f"{text[:keep]}…{text[-keep:]} ({len(text)} characters)"


def alpha_value(text: str) -> float:
    """An argparse type: one alpha, checked by the switch's validator."""
    from .switch import AlphaError, parse_alpha

    try:
        return parse_alpha(text, "alpha", text=True)
    except AlphaError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


ratio_value = number(float, 0.0, 1.0, "expected a fraction such as 0.01, got {text!r}",
                     "the ortho ratio is a fraction in [0, 1] (0.01 = 1 %), got {value}")
positive_int = number(int, 1, math.inf, "expected a positive integer, got {text!r}",
                      "expected a positive integer, got {value}")
nonnegative_float = number(float, 0.0, math.inf, "expected a number >= 0, got {text!r}",
                           "expected a number >= 0, got {value}")
whole_number = number(int, 0, math.inf, "expected a whole number >= 0, got {text!r}",
                      "expected a whole number >= 0, got {value}")
# A random seed: what torch and NumPy generators take (an unsigned 64-bit value fits neither's signed path).
seed_value = number(int, 0, 2**63 - 1, "expected a whole number seed, got {text}",
                    "a seed must lie in [0, 2^63 - 1], got {value}")
window_value = number(int, 2, math.inf, "expected a whole number of tokens, got {text!r}",
                      "a perplexity window needs at least 2 tokens (one predicts the next), got {value}")


def regex_value(text: str) -> str:
    """An argparse type: a regular expression, checked to compile."""
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({err})") from None
    return text


# ---- input files -----------------------------------------------------------------------------
def read_text(path: str) -> str:
    """The UTF-8 text of a file that must exist and hold more than white space."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a folder; expected a text file")
    if not p.exists():
        raise UserError(f"text file {path} does not exist")
    if not p.is_file():
        raise UserError(f"{path} is {_special_file_kind(p)}, not a regular file; expected a text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def _special_file_kind(p: Path) -> str:
    """What a path that exists but is neither a file nor a folder is, in words."""
    if p.is_fifo():
        return "a named pipe (FIFO)"
    if p.is_char_device() or p.is_block_device():
        return "a device"
    if p.is_socket():
        return "a socket"
    return "not a regular file"


def checked_prompt(prompt: str, flag: str = "--prompt") -> str:
    """A prompt from the command line that is non-empty UTF-8 text (argv bytes that are not
    UTF-8 arrive as lone surrogates, which no tokenizer takes)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = prompt[err.start:err.end].encode("utf-8", "surrogateescape")
        raise UserError(f"{flag} is not UTF-8 text (bytes {bad.hex(' ')} at character {err.start})") from None
    if not prompt.strip():
        raise UserError(f"{flag} is empty; give the text to continue")
    return prompt


def read_secrets(path: str) -> list[str]:
    """Secrets to exclude: one per line, or JSONL records whose 'secret' is taken."""
    secrets = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                secret = jsontext.loads(line).get("secret")
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON record ({err.msg})") from None
            except AttributeError:
                raise UserError(f"{path}:{lineno}: invalid JSON record (not an object)") from None
            if not isinstance(secret, str):
                raise UserError(f"{path}:{lineno}: a JSON record needs a 'secret' string")
            secrets.append(secret)
        else:
            secrets.append(line)
    return secrets
