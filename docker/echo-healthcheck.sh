#!/bin/bash
# Container healthcheck: one byte-exact echo round trip on the server's own port.
# Bash's /dev/tcp keeps it cheap: no interpreter start-up on a loaded machine.
exec 3<>"/dev/tcp/127.0.0.1/${ECHO_PORT:-15001}" || exit 1
printf 'healthy?' >&3
IFS= read -r -t 8 -N 8 reply <&3 || exit 1
[ "$reply" = 'healthy?' ]
