"""The command line of train.py, sample.py and bench.py: `--key=value` into a config dataclass.

    python train.py --help           # purpose, examples, and every option with its type and default
    python sample.py --temperature=0.7 --top_p=0.9

Each field of the dataclass is an option, parsed as its field's type (a bare --flag sets a bool).
The help text is read from the program's own docstring and from the comments beside the fields,
so it cannot drift from the code. A mistake on the command line (an unknown option, a value of the
wrong type, a path that does not exist) is a UsageError: one line, exit status 2, no traceback; a
file that is not what its option expects is an InputError: one line, exit status 1.
"""
import inspect
import os
import re
import sys
from dataclasses import fields


class UsageError(SystemExit):
    """A user's mistake on the command line, reported by `run` as one line with exit status 2."""


class InputError(ValueError):
    """A file (or a row of one) that is not what its option expects: raised as
    InputError(f"{path}: what was expected"), reported by `run` as that one line with exit status 1.
    The user's data is wrong, not the program: no traceback (a genuine bug keeps its own)."""


def json_lines(path, expected):
    """(line number, text) of each line of a JSON-lines file that is not blank. A path that is not a
    file is an InputError naming what the option expected."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file; expected {expected}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def run(main):
    """Call main(sys.argv[1:]) as a program's entry point."""
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except InputError as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def parse_args(cls, argv, paths=()):
    """A `cls` config from --key=value arguments. `paths` names the fields that hold files or
    directories which must exist when given. --help / -h prints the help text and exits 0."""
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    cfg, names = cls(), sorted(f.name for f in fields(cls))
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in names:
            raise UsageError(f"unknown option {arg!r}; valid: " + " ".join(f"--{n}" for n in names)
                             + " (--help explains each)")
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in ("", "1", "true", "yes", "0", "false", "no"):
                raise UsageError(f"--{key} expects true or false, got {value!r}")
            value = value.lower() in ("", "1", "true", "yes")
        else:
            try:
                value = kind(value)
            except ValueError:
                raise UsageError(f"--{key} expects {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, value)
    for key in paths:
        if getattr(cfg, key) and not os.path.exists(getattr(cfg, key)):
            raise UsageError(f"--{key}={getattr(cfg, key)}: no such file or directory")
    return cfg


def given(argv):
    """The option names given in argv (--key=value or --key), as a set."""
    return {arg.removeprefix("--").partition("=")[0] for arg in argv}


def help_text(cls):
    """The first paragraph of the program's docstring, its example commands, then one line per
    option: --name=type, default, and the comment beside the field (section comments as headings)."""
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    purpose = doc.split("\n\n")[0].replace("\n", " ")
    examples = [line for line in doc.splitlines() if re.match(r"\s*(python|torchrun) ", line)]
    defaults, lines = cls(), [purpose, "", "examples:", *examples, "", "options:"]
    known = {f.name for f in fields(cls)}
    for line in inspect.getsource(cls).splitlines()[1:]:
        field = re.match(r"\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if field and field.group(1) in known:
            name, note = field.group(1), field.group(2) or ""
            value = getattr(defaults, name)
            option = f"  --{name}={type(value).__name__}"
            lines.append(f"{option:<28} {repr(value) if value != '' else '(none)':<14} {note}".rstrip())
        elif line.strip().startswith("#"):
            lines.append("  " + line.strip().lstrip("# "))
    return "\n".join(lines)
