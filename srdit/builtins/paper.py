"""The SR-DiT paper, which every technique it combines cites besides its own source."""

SRDIT = "Speedrunning ImageNet Diffusion (SR-DiT), arXiv:2512.12386"
