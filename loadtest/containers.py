"""The compose stack's containers at their own addresses, asked of Docker.

A published port (`127.0.0.1:15001`) reaches a container through Docker's
userland proxy: one `docker-proxy` process per port, two descriptors and a copy
of every byte per connection. Under 1,000 connects a second it was the proxy
that timed out, not the server, and at 4,000 held connections it exited. So a
flood aimed at the servers goes to each container's address on the project's
network instead, which only Docker can tell (and which only the project's own
containers have: the attack tool still refuses any other address that is not
loopback).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

from loadtest.attacks import AttackRefused

DOCKER_TIMEOUT = 15.0


# A container's networks as `docker inspect -f` prints them: "name=address " each.
NETWORKS = "{{range $name, $net := .NetworkSettings.Networks}}{{$name}}={{$net.IPAddress}} {{end}}"


def parse_networks(words: list[str]) -> dict[str, str]:
    """{network: address} from the words NETWORKS prints."""
    return dict(word.partition("=")[::2] for word in words)


def container_address(project: str, service: str) -> str | None:
    """The address of `service`'s running container in compose project `project` on
    its network, or None when there is no Docker or no such container."""
    found = _networks_of(project, service)
    if found is None:
        return None
    addresses = [address for address in found.values() if _is_private(address)]
    if not addresses:
        raise AttackRefused(f"{project}/{service}: its container has no network address")
    return addresses[0]


def container_network(project: str, service: str) -> str | None:
    """The network on which `container_address` found `service`'s container: where a
    botnet's own containers join it (`loadtest.botnet`)."""
    found = _networks_of(project, service)
    if found is None:
        return None
    names = [name for name, address in found.items() if _is_private(address)]
    return names[0] if names else None


def container_id(project: str, service: str) -> str | None:
    """The id of `service`'s one running container in compose project `project`, or
    None when there is no Docker or no such container."""
    if shutil.which("docker") is None:
        return None
    labels = [
        f"label=com.docker.compose.project={project}",
        f"label=com.docker.compose.service={service}",
    ]
    found = docker_output("ps", "-q", *(arg for label in labels for arg in ("--filter", label)))
    ids = found.split()
    if len(ids) > 1:
        raise AttackRefused(f"{project}/{service}: {len(ids)} containers run; expected one")
    return ids[0] if ids else None


def main_pid(container: str) -> int | None:
    """The pid (in this host's view) of a container's main process; None when it does
    not run (or Docker does not answer)."""
    try:
        pid = int(docker_output("inspect", "-f", "{{.State.Pid}}", container).strip())
    except (AttackRefused, ValueError):
        return None
    return pid or None


def _networks_of(project: str, service: str) -> dict[str, str] | None:
    """{network: address} of the one running container of `service`, None if none runs."""
    found = container_id(project, service)
    if found is None:
        return None
    return parse_networks(docker_output("inspect", "-f", NETWORKS, found).split())


def _is_private(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_private
    except ValueError:
        return False


def docker_output(*args: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 (fixed docker subcommands)
            ["docker", *args],  # noqa: S607 (docker from PATH, as make and compose use it)
            capture_output=True,
            text=True,
            timeout=DOCKER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AttackRefused(f"docker {args[0]}: {error}") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise AttackRefused(f"docker {args[0]}: {message}")
    return done.stdout
