# The one image of all three echo servers; the model is chosen by ECHO_MODEL.
# Nothing runs at build time and nothing is fetched: `make images` stages the
# pure-Python dependencies under build/image/site beforehand.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
COPY build/image/site /opt/echo/site
COPY services /opt/echo/services
COPY docker/echo-healthcheck.sh /opt/echo/healthcheck.sh
ENV PYTHONPATH=/opt/echo/site:/opt/echo \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ECHO_HOST=0.0.0.0
WORKDIR /opt/echo
USER 10001:10001
# One real round trip on the server's own port. A bounded server that is full
# turns the check away too, so allow a few misses before "unhealthy".
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/bin/bash", "/opt/echo/healthcheck.sh"]
ENTRYPOINT ["python3", "-m", "services"]
