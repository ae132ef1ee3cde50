# normserve, CPU image. docker-compose.yml builds it as the service `normserve`;
# by hand: docker build -t normserve . && docker run -p 50051:50051 -v normserve-state:/var/lib/normserve normserve
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY normkernels normkernels
COPY server server
COPY client client
COPY tools tools
COPY protos protos
RUN python -m venv /opt/normserve && /opt/normserve/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/normserve /opt/normserve
# A system user that owns nothing but the state folder and the compiled-kernel cache.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/normserve normserve \
    && mkdir -p /var/lib/normserve /var/cache/normserve \
    && chown normserve:normserve /var/lib/normserve /var/cache/normserve
# Configuration is by environment: every flag of `normserve serve --help` has a NORMSERVE_* variable.
ENV PATH=/opt/normserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NORMSERVE_HOST=0.0.0.0 \
    NORMSERVE_PORT=50051 \
    NORMSERVE_METRICS_PORT=9464 \
    NORMSERVE_STATE_DIR=/var/lib/normserve \
    NORMKERNELS_CACHE_DIR=/var/cache/normserve
USER normserve
# The compiled CPU kernels, built now as the serving user into NORMKERNELS_CACHE_DIR (site-packages is
# root's and read-only to it): the server starts warm. On a host with another CPU it compiles them once
# at start: it listens at once, health NOT_SERVING until they are ready (minutes on 2 cores: hence the start period).
RUN python3 -c "from normkernels import compiled; assert compiled.warm_up(), 'no compiled CPU kernels'"
VOLUME ["/var/lib/normserve"]
EXPOSE 50051 9464
# `normserve health` checks 127.0.0.1:$NORMSERVE_PORT and exits 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["normserve", "health"]
# SIGTERM drains in-flight calls (NORMSERVE_GRACE_PERIOD, 30 s) and closes the store cleanly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["normserve"]
CMD ["serve"]
