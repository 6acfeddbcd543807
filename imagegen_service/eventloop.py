"""The event loop both processes run on: uvloop where installed (faster sockets and
callbacks for the gRPC and HTTP paths), asyncio's own when IMAGEGEN_UVLOOP=0."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("IMAGEGEN_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
