# Prometheus with this project's configuration and rules baked in: the upstream
# image by default, or one built from Debian's `prometheus` package (OFFLINE=1).
ARG PROMETHEUS_IMAGE=prom/prometheus:v2.53.2
FROM ${PROMETHEUS_IMAGE}
COPY prometheus /etc/echo-cluster
USER 65534:65534
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/-/ready"]
ENTRYPOINT ["prometheus", \
    "--config.file=/etc/echo-cluster/prometheus.yml", \
    "--storage.tsdb.path=/prometheus", \
    "--storage.tsdb.retention.time=7d", \
    "--web.console.templates=/etc/echo-cluster/consoles", \
    "--web.console.libraries=/etc/echo-cluster/console_libraries", \
    "--web.listen-address=0.0.0.0:9090"]
