"""main.py's command line, built from the settings classes (flcore/settings.py): the general flags are
RunSettings' fields, each algorithm's are its server's `Settings` fields, so `main.py -h` lists them grouped by
algorithm. The reference library's short names are kept. Parsing gives a Config: the run's settings and the chosen
algorithm's, resolved (defaults included) and validated once."""
import argparse
import importlib
import sys
from dataclasses import MISSING, fields

from flcore.algorithms import server_class, server_classes
from flcore.errors import UserError
from flcore.settings import Config, RunSettings, Settings, field_type, own_fields, str2bool
from flutils.config_file import check_keys_apply, read_config


def import_plugins(argv):
    """Imports the modules named by --import (a user's algorithms, which register themselves) before the parser
    is built, so their flags are part of it."""
    pre = OneLineErrorParser(prog="main.py", add_help=False)
    pre.add_argument("--import", dest="plugins", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    for module in known.plugins:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"--import {module}: {exc}; pass a module on the Python path (e.g. a file in system/ "
                            f"without .py)") from None


def settings_classes():
    """RunSettings, then every settings class of a registered algorithm and their parents, each once."""
    classes = [RunSettings]
    for server_cls in server_classes():
        for klass in reversed(server_cls.Settings.__mro__):
            if isinstance(klass, type) and issubclass(klass, Settings) and klass is not Settings \
                    and klass not in classes:
                classes.append(klass)
    return classes


def default_text(name, classes):
    """The default a flag shows in -h: its one value, or each declaring group's own when they differ."""
    defaults = {}
    for klass in classes:
        declared = {f.name: f for f in fields(klass)}
        if name in declared:
            f = declared[name]
            defaults[klass.title] = repr(f.default) if f.default is not MISSING else "required"
    if len(set(defaults.values())) == 1:
        return next(iter(defaults.values()))
    return ", ".join(f"{title} {value}" for title, value in defaults.items())


def add_flag(group, f, default):
    kind = field_type(f)
    meta = f.metadata
    help_text = f"{meta['help']} (default: {default})" if meta["help"] else f"default: {default}"
    names = list(meta["flags"])
    if kind is bool:
        group.add_argument(*names, dest=f.name, type=str2bool, nargs="?", const=True, default=argparse.SUPPRESS,
                           metavar="0|1", help=help_text)
    else:
        group.add_argument(*names, dest=f.name, type=kind, choices=meta["choices"], default=argparse.SUPPRESS,
                           help=help_text)


class OneLineErrorParser(argparse.ArgumentParser):
    """A usage error is one line (`main.py: error: ...`, exit 2), not the 50-line usage above it: argparse's
    message names the flag and, for a flag with choices, the valid ones; -h lists the rest."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (main.py -h lists every flag)\n")


def build_parser():
    p = OneLineErrorParser(
        prog="main.py", description="Heterogeneous federated learning: FedKTL and baselines, simulated in one process.")
    p.add_argument("--import", dest="plugins", action="append", default=[], metavar="MODULE",
                   help="import this module first (a user's algorithm that calls flcore.algorithms.register)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="experiment file: flat TOML whose keys are the long flag names (global_rounds = 2); flags "
                        "given here override it. Each run saves its resolved one as <results>.toml")
    classes = settings_classes()
    declared = {}
    for klass in classes:
        own = [f for f in own_fields(klass) if f.name not in declared]
        if not own:
            continue
        group = p.add_argument_group(klass.title, klass.description or None)
        for f in own:
            declared[f.name] = f.metadata["flags"]
            add_flag(group, f, default_text(f.name, classes))
    for klass in classes:  # a flag several algorithms declare must have the same names everywhere
        for f in fields(klass):
            if "flags" in f.metadata and declared.get(f.name) != f.metadata["flags"]:
                raise ValueError(f"{klass.__name__}.{f.name} is declared with flags {f.metadata['flags']}, "
                                 f"elsewhere with {declared.get(f.name)}")
    return p


def resolve(values):
    """The Config of the given flag values ({field name: value}; missing ones take their defaults): the run's
    settings, the algorithm's (its server class's Settings), and the algorithm's checks of the run."""
    run = RunSettings.from_values(values)
    server_cls = server_class(run.algorithm)
    algo = server_cls.Settings.from_values(values)
    server_cls.check_models(run)
    server_cls.check_run(algo, run)
    return Config(run, algo)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    import_plugins(argv)
    values = vars(build_parser().parse_args(argv))
    values.pop("plugins", None)
    path = values.pop("config", None)
    if path is None:
        return resolve(values)
    from_file = read_config(path, settings_classes())
    config = resolve({**from_file, **values})
    check_keys_apply(from_file, config, settings_classes(), path)
    return config
