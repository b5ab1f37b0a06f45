"""Evaluation: the test-split comparison of CNN, ViT and ensembles, its metrics, report and Grad-CAM grid."""
