"""What the Hydra apps (`moesys-train`, `moesys-eval`, `moesys-generate`) share: bad input is one line
on stderr and exit code 2 (a usage error), never a traceback through Hydra and the ranks.

Hydra's own errors (unknown key, wrong type, bad override syntax, a missing preset, a value left at
???) and `ConfigError` (the config's checks, the data, the checkpoint) are caught; nothing else is,
so a failure in training or evaluation keeps its traceback. `<debug key>=true` prints the traceback
above the line.
"""
from __future__ import annotations

import re
import sys
import traceback
from typing import Callable, List, NoReturn, TypeVar

from moesys.errors import ConfigError

EXIT_BAD_INPUT = 2
T = TypeVar("T")


def error_prefix(prog: str) -> str:
    return f"{prog}: error: "


def exit_bad_input(prog: str, message: str, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exc()
    print(error_prefix(prog) + " ".join(message.split("\n")).strip(), file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def hydra_message(e: Exception) -> str:
    """One line from a Hydra composition error: its first line, the options it lists, and the first
    line of the OmegaConf error under it (which names the key and the value)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    out = lines[0].rstrip(".")
    if any(ln.startswith("Available options") for ln in lines):
        i = next(k for k, ln in enumerate(lines) if ln.startswith("Available options"))
        opts = [ln for ln in lines[i + 1:] if not ln.startswith("Config search path")]
        opts = opts[: next((k for k, ln in enumerate(opts) if ln.startswith("provider=")), len(opts))]
        out += f" (available: {', '.join(opts)})"
    elif e.__cause__ is not None and str(e.__cause__).strip():
        out += ": " + str(e.__cause__).strip().splitlines()[0]
    elif len(lines) > 1 and not lines[1].startswith("See "):
        out += ": " + lines[1]
    return out


def debug_requested(overrides: List[str], debug_key: str) -> bool:
    """Whether the command line sets `debug_key` true (read before the config composes: it may not)."""
    pattern = re.compile(r"\+{0,2}" + re.escape(debug_key) + r"=(true|yes|on|1)", re.IGNORECASE)
    return any(pattern.fullmatch(a) for a in overrides)


def compose_checked(prog: str, config_name: str, overrides: List[str], check: Callable[..., T], *,
                    debug_key: str = "debug") -> T:
    """Compose `config_name` from moesys.configs with these overrides as Hydra will and run `check`
    on the composed DictConfig (it returns the typed config and raises ConfigError on bad values).

    Runs before Hydra creates any run dir and before any rank: bad input prints one line
    (`<prog>: error: ...`) and exits with EXIT_BAD_INPUT, writing nothing. Returns check's result.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    debug = debug_requested(overrides, debug_key)
    try:
        with initialize_config_module("moesys.configs", version_base="1.3"):
            dcfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        exit_bad_input(prog, hydra_message(e), debug)
    debug = bool(OmegaConf.select(dcfg, debug_key, default=False))
    try:
        return check(dcfg)
    except ConfigError as e:
        exit_bad_input(prog, str(e), debug)


def plain_overrides(overrides: List[str]) -> bool:
    """No Hydra flags (--help, --cfg, -m, -cd ...) and no multirun: the early check applies (with
    flags Hydra's own messages and behaviour are kept)."""
    return not any(a.startswith("-") or a.startswith("hydra.mode=") for a in overrides)


def run_app(prog: str, config_name: str, check: Callable, hydra_main: Callable) -> None:
    """A Hydra app's main(): plain overrides are composed and checked first (bad input is one line
    and EXIT_BAD_INPUT, nothing written), then Hydra runs `hydra_main` on configs/<config_name>.yaml;
    flags (--help, --cfg ...) and sweeps go to Hydra untouched."""
    import hydra

    overrides = sys.argv[1:]
    if plain_overrides(overrides):
        compose_checked(prog, config_name, overrides, check)
    hydra.main(version_base="1.3", config_path="pkg://moesys.configs", config_name=config_name)(hydra_main)()
