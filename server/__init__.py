"""normserve.server: the gRPC service over normkernels.

``app`` assembles and runs the server, ``servicer`` translates between the
wire and the ``registry`` of named layers, ``store`` keeps their state in
SQLite, and ``layer_config`` maps LayerConfig messages to layers. The
``normserve`` command that runs it is :mod:`normserve.tools.cli`.
"""
