"""The one "telemetry off, nothing fetched at run time" environment (stack.md lists what each variable silences).

Ground floor: imports nothing from lesionflow, so the CLI, the Prefect server settings (serve), the tests and the
benchmarks all read this one definition. The Makefile's ``export NAME := value`` lines and the compose file's
``x-telemetry-off`` block must hold exactly these pairs (tests/test_quiet_env.py checks both).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType

QUIET_ENV: Mapping[str, str] = MappingProxyType(
    {
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }
)


def apply_quiet_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set every :data:`QUIET_ENV` variable the environment does not set already (a user's value wins)."""
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)
