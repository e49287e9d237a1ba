"""Loading a diffusers model folder or hub id: what counts as a bad path, which dtype argument the
installed diffusers takes, and keeping the libraries quiet while they load."""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Dict

from diffusers import DiffusionPipeline
from diffusers.utils import is_accelerate_available
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog

from ..errors import InputError, MissingInputError

__all__ = ["check_model_path", "dtype_keyword", "loading_kwargs", "quiet_loading", "load_error_message"]


def check_model_path(name_or_path: Any) -> str:
    """The name to hand to diffusers: an existing pipeline folder (``~`` expanded) or a hub id.

    Raises :class:`~o2mag.errors.InputError` for a folder without ``model_index.json`` or a file,
    and :class:`~o2mag.errors.MissingInputError` for a path that does not exist (anything that
    starts with ``.``, ``/`` or ``~`` or has more than one ``/`` cannot be a hub id)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a str or os.PathLike, "
                        f"got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise InputError(
                f"{name} is not a diffusers pipeline folder (no model_index.json); point --model at a "
                "folder such as stable-diffusion-v1-5 that holds model_index.json, unet/, vae/, "
                "text_encoder/, tokenizer/ and scheduler/")
        return expanded
    if os.path.exists(expanded):
        raise InputError(f"{name} is a file, not a diffusers pipeline folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep == "\\" and "\\" in name):
        raise MissingInputError(f"model folder not found: {name}")
    return name


def dtype_keyword() -> str:
    """``"dtype"`` where the installed diffusers' ``from_pretrained`` takes it, else ``"torch_dtype"``.

    Recent diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works but warns);
    older ones know only ``torch_dtype`` and would ignore ``dtype``. The method's documented
    parameters tell which one this installation has."""
    doc = DiffusionPipeline.from_pretrained.__doc__ or ""
    return "dtype" if re.search(r"^\s*dtype \(", doc, re.MULTILINE) else "torch_dtype"


def loading_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments in the names the installed diffusers takes.

    ``dtype``/``torch_dtype`` (either name) is passed under :func:`dtype_keyword`; giving both is an
    error. Without accelerate, ``low_cpu_mem_usage`` defaults to False: diffusers would switch it
    off anyway, after a warning that says only that."""
    out = dict(kwargs)
    given = [k for k in ("dtype", "torch_dtype") if out.get(k) is not None]
    if len(given) == 2:
        raise ValueError("give dtype or torch_dtype, not both (torch_dtype is the older name)")
    for k in ("dtype", "torch_dtype"):
        out.pop(k, None)
    if given:
        out[dtype_keyword()] = kwargs[given[0]]
    if not is_accelerate_available():
        out.setdefault("low_cpu_mem_usage", False)
    return out


def load_error_message(error: BaseException) -> str:
    """diffusers' loading error as one self-contained line. Where diffusers points to "the root
    cause in the stacktrace above" (a hub id that is neither cached nor reachable, e.g. with
    ``HF_HUB_OFFLINE=1``), the cause it chained is named instead: the ``o2mag`` command prints
    no stack trace."""
    text = " ".join(str(error).split())
    cause = error.__cause__ or error.__context__
    if "stacktrace above" in text:
        text = text.replace("Please check out the root cause in the stacktrace above.", "").strip()
        if cause is not None:
            text += f" Cause: {' '.join(str(cause).split())}"
    return text


@contextlib.contextmanager
def quiet_loading(quiet: bool = True):
    """Within the block, diffusers and transformers print nothing -- no progress bars, no advice,
    no error lines: a failure to load raises, and the ``o2mag`` command reports it in its own one
    line (``--quiet``); their previous settings come back afterwards."""
    if not quiet:
        yield
        return

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    try:
        for lib, _, _ in saved:
            lib.set_verbosity(lib.CRITICAL)  # not even logger.error (diffusers logs one, then raises)
            lib.disable_progress_bar()
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
