"""Wind-tunnel proxy shape 70m (DESIGN.md section 2)."""

from experiments.configs.tunnel_shapes import tunnel_config


def get_config():
    return tunnel_config("70m")
