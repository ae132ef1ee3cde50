"""normserve.v1: the wire API (generated messages and stubs) and its tensor codec.

``normalization_pb2`` / ``normalization_pb2_grpc`` are generated from
``normalization.proto`` by ``make protos``; ``codec`` converts between NumPy
arrays and ``Tensor`` messages for both the server and the client.
"""
