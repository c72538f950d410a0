"""`d2r info`: how the native core was built (JSON)."""
from __future__ import annotations

import json

from d2r.cli._common import EXIT_OK, add_command


def register(sub) -> None:
    p = add_command(sub, "info", "how the native core was built (JSON)")
    p.set_defaults(func=run)


def run(args) -> int:
    from d2r.core.runtime import build_info

    print(json.dumps(build_info(), indent=2))
    return EXIT_OK
