# The tools image: locust with this project's locustfile, for the compose profile `load`
# (a master and N workers); the attack tool, for a botnet's members (loadtest.botnet);
# and the peer echo servers, for the compose profile `peers` (bench/). Like the echo
# image, nothing runs at build time and nothing is fetched: `make images` stages
# locust, uvloop and their dependencies, as wheels for this image's Python, under
# build/locust/site, and the C peer under build/locust/bin beforehand.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
COPY build/locust/site /opt/load/site
COPY services /opt/load/services
COPY loadtest /opt/load/loadtest
COPY bench /opt/load/bench
COPY build/locust/bin /opt/load/bin
# Where the master writes its reports: a volume, owned by the user it runs as.
COPY --chown=10001:10001 build/locust/reports /reports
ENV PYTHONPATH=/opt/load/site:/opt/load \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /opt/load
USER 10001:10001
ENTRYPOINT ["python3", "-m", "locust", "-f", "/opt/load/loadtest/locustfile.py"]
