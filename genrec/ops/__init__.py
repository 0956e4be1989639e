"""Fast paths for HSTU (paper §5): blocked attention, jagged sequences, M-FALCON candidate ranking.

Each module keeps the plain PyTorch path of ``genrec.models.hstu`` as its reference and is parity-tested against
it (tests/ops). Nothing here changes ``genrec.models.hstu``; see each module for how to call it.
"""
