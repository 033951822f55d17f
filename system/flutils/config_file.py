"""Experiment files: a flat TOML whose keys are main.py's long flag names (`global_rounds = 2`), read with checked
types, and each run's resolved configuration written back in the same form so `main.py --config FILE` reruns it.

Paths in a file are taken as they are, like the same flags on the command line (relative ones from the directory
main.py runs in)."""
import argparse
import difflib
import json
import math
import os
import tomllib
from dataclasses import fields

from flcore.errors import UserError
from flcore.settings import field_type, str2bool

TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def declared_fields(classes):
    """{long flag name: its field} over the settings classes (the first declaration of a shared flag)."""
    found = {}
    for klass in classes:
        for f in fields(klass):
            if "flags" in f.metadata:
                found.setdefault(f.name, f)
    return found


def unknown_key_error(key, known, where):
    """The UserError for a key no settings class declares, naming the closest flag."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean --{close[0]}?" if close else "python system/main.py -h lists the flags"
    return UserError(f"unknown key '{key}' in {where}; {hint}")


def checked_value(key, value, f, where):
    """`value` (as TOML gives it) if it fits the field's type and choices (an integer is a fine float); raises
    UserError naming the key and the type otherwise."""
    kind = field_type(f)
    fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, fits = float(value), True
    if not fits:
        raise UserError(f"key '{key}' in {where} must be {TYPE_NAMES[kind]}, got {value!r}")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise UserError(f"key '{key}' in {where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def text_value(key, text, f, where):
    """A command-line string (a sweep's grid value) converted to the field's type; UserError naming the key and
    the type when it does not parse."""
    kind = field_type(f)
    try:
        value = str2bool(text) if kind is bool else kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"key '{key}' in {where} must be {TYPE_NAMES[kind]}, got {text!r}") from None
    return checked_value(key, value, f, where)


def read_config(path, classes):
    """{field name: value} of the experiment file at `path`, every key declared by one of `classes` (the settings
    classes) and of its type; raises UserError (one line) otherwise."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: not a readable TOML file ({exc})") from None
    known = declared_fields(classes)
    values = {}
    for key, value in data.items():
        if key not in known:
            raise unknown_key_error(key, known, path)
        values[key] = checked_value(key, value, known[key], path)
    return values


def check_keys_apply(keys, config, classes, where):
    """Every key (of a file or a sweep's grid) is a setting of the configuration's algorithm (or a general one): a
    key only another algorithm declares would be ignored, so it is refused, naming who declares it."""
    own = config.values()
    for key in keys:
        if key not in own:
            owners = [k.title for k in classes if key in {f.name for f in fields(k)}]
            raise UserError(f"key '{key}' in {where} is not a setting of {config.run.algorithm} (it is one of "
                            f"{', '.join(owners)}); remove it or choose such an algorithm")


def toml_value(value):
    """One value as TOML: booleans, integers, floats (inf/nan included) and strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):  # JSON's escapes (\" \\ \n \uXXXX ...) are TOML's basic-string escapes
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"no TOML form for {value!r}")


def config_text(config, title):
    """The resolved configuration as an experiment file; a setting left at None (its algorithm derives it, e.g.
    -slr from -lr) is left out, which reads back as the same None."""
    lines = [f"# {title}: every setting, defaults included. Rerun: python system/main.py --config THIS_FILE"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.values().items() if value is not None]
    return "\n".join(lines) + "\n"


def write_config(path, config, title):
    """Atomic, like the results beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(config_text(config, title))
    os.replace(tmp, path)
