"""What a user must see (a skipped file, a truncated prompt, a corrected setting): the `latentdiffusion` logger.

Not `warnings.warn`: PYTHONWARNINGS=ignore (common in containers and notebooks) or a warnings filter would hide
them. In Python, an application that configures logging decides where they go; without any configuration Python's
last-resort handler prints them on stderr. The `ldm` command prints them as `ldm: warning: ...` lines.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("latentdiffusion")


def warn(message: str) -> None:
    """Tell the user something went other than asked (a file skipped, text cut), without stopping."""
    logger.warning(message)
