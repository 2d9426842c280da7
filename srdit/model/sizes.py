"""Backbone sizes: name -> (depth, hidden width, heads). SiT/DiT sizes as in Peebles & Xie 2023, Table 1."""

SIZES: dict[str, tuple[int, int, int]] = {
    "debug": (6, 64, 4),  # trains on 8x8 digits on a 2-core CPU in about a minute; head dim 16 (2-D RoPE needs 4 | d)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
