"""The image path exported for deployment: ONNX graphs (run by :mod:`qformer.onnx`) or
torch.export programs, with ``export.json``, the tokenizers and the preprocessing beside them."""
