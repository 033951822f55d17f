"""The part of NVIDIA's ``torch_utils`` package that their network pickles need: ``persistence``
(rebuilds pickled networks from their embedded source), ``misc`` and the resampling and activation
ops in ``ops``, all in plain PyTorch."""
