"""normserve.server: the gRPC service over normkernels.

``app`` assembles and runs the server, ``servicer`` translates between the
wire and the ``registry`` of named layers, ``store`` keeps their state in
SQLite, ``layer_config`` maps LayerConfig messages to layers, and ``cli`` is
the ``normserve`` command.
"""
