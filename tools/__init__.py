"""normserve.tools: the programs built on both sides of the wire.

``cli`` is the ``normserve`` command (serve, cluster, rebalance, health,
layers, bench), ``bench`` its benchmark harness, ``nginx``, ``cluster`` and
``rebalance`` the layer-sharded deployment behind nginx. This is the one
package that may import both :mod:`normserve.server` and
:mod:`normserve.client`; neither of those imports it, nor each other.
"""
