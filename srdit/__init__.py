"""srdit: ablation studies for diffusion transformers (SR-DiT techniques as switches)."""

__version__ = "0.1.0"
