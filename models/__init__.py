"""Plain-PyTorch side of the project: label spaces, timm backbones with two heads, losses, the ensemble.

Nothing in this package imports ray, so evaluation, tuning and serving can all use it directly.
"""
