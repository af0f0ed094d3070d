"""ModelTunnel v2: hyperparameter sweeps on small muP proxies, scaling-law fits, ScalingBench, reports."""
