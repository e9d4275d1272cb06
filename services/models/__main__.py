"""`python -m services.models`: the registered models and their ports, as `make up` prints them."""

from __future__ import annotations

import sys

from services.models import MODELS


def main(host: str = "127.0.0.1") -> int:
    for spec in MODELS.values():
        print(
            f"  {spec.name:<9} echo {host}:{spec.port:<6} "
            f"metrics http://{host}:{spec.metrics_port}/metrics   {spec.summary}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
