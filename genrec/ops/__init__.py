"""Building blocks and fast paths of HSTU (paper §3.1 and §5).

``hstu_math``: the layer's math as functions of tensors and weights, the one definition shared by the model
(``genrec.models.hstu``, the padded reference path) and by the fast paths, each parity-tested against that
reference (tests/ops): ``hstu_attention`` (blocked attention engine), ``jagged`` (jagged batches), ``mfalcon``
(cached candidate ranking). ``dropout`` and ``native`` hold the counter-based dropout and the optional C kernels.
Nothing here imports ``genrec.models``: the fast paths take a model's or layer's parameters (duck-typed objects).
"""
