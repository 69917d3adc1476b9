"""Where tensors and objects cross ranks: the mesh, point-to-point, collectives.

``topology`` lays out the (pp, dp, cp, tp) mesh and builds its process groups,
``p2p`` moves stage payloads, ``collectives`` and ``objects`` do the rest, and
``errors`` turns a backend's failure into one that names the ranks.
"""
