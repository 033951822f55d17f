"""Errors that reach the user as one line, without a traceback."""
import re


class UserError(Exception):
    """Bad input or environment: main.py prints the message and exits with status 2."""


def out_of_memory(exc):
    """The UserError for a torch.OutOfMemoryError: what ran out and the flags that make a run fit."""
    tried = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
    what = f" ({tried.group(0).lower()})" if tried else ""
    return UserError(f"out of GPU memory{what}; make the run fit with --offload (client models wait in CPU memory "
                     f"between turns), a smaller -gbs (FedKTL's generator batch) or --client_state disk (one client "
                     f"in memory at a time)")
