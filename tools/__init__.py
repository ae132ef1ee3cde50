"""normserve.tools: the programs built on both sides of the wire.

``cli`` is the ``normserve`` command (serve, health, layers, bench) and
``bench`` its benchmark harness. This is the one package that may import both
:mod:`normserve.server` and :mod:`normserve.client`; neither of those imports
it, nor each other.
"""
