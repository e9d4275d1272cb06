"""One attack in a process of its own: a botnet's member in a container (`loadtest.botnet`).

    python -m loadtest.attacker '{"scenario": "botnet", "address": ["172.18.0.3", 15001], ...}'

The argument is an `AttackPlan` as JSON, checked as any plan is. The attack's counts
go to standard output as one JSON line every REPORT_EVERY seconds and once at the
end. It ends when its duration is over or when its standard input closes: the flood
that started it is done with it, or gone.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any, TextIO

from loadtest.attacks import Attack, AttackPlan, AttackRefused, ensure_descriptors

REPORT_EVERY = 0.5


def plan_to_json(plan: AttackPlan) -> str:
    return json.dumps(asdict(plan), separators=(",", ":"))


def plan_from_json(text: str) -> AttackPlan:
    try:
        given = json.loads(text)
    except ValueError as error:
        raise AttackRefused(f"plan: not JSON ({error})") from None
    known = {f.name for f in fields(AttackPlan)}
    if not isinstance(given, dict) or not known >= given.keys() or "scenario" not in given:
        raise AttackRefused(f"plan: a JSON object with a scenario and fields of {sorted(known)}")
    for key in ("address", "side_address"):
        given[key] = _address(given.get(key), key)
    try:
        return AttackPlan(**given)
    except TypeError as error:
        raise AttackRefused(f"plan: {error}") from None


def _address(value: Any, key: str) -> tuple[str, int] | None:
    if value is None and key == "side_address":
        return None
    if not (isinstance(value, list) and len(value) == 2):
        raise AttackRefused(f"plan: {key} is [host, port]")
    host, port = value
    if not (isinstance(host, str) and isinstance(port, int) and 0 < port < 65536):
        raise AttackRefused(f"plan: {key} is [host, port]")
    return host, port


def main(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 1:
            raise AttackRefused("usage: python -m loadtest.attacker PLAN_JSON")
        plan = plan_from_json(args[0])
        ensure_descriptors(plan.target_count)
        attack = Attack(plan)
    except AttackRefused as error:
        print(f"loadtest.attacker: {error}", file=sys.stderr)
        return 2

    def stop_at_end_of_input() -> None:  # whoever started it is done with it, or gone
        stdin.read()
        attack.stop()

    threading.Thread(target=stop_at_end_of_input, daemon=True).start()
    attack.start()
    while attack.is_alive():
        attack.join(REPORT_EVERY)
        print(json.dumps(asdict(attack.counts())), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
