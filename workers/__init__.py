"""Ray: the walk's executor on a pool of actors (ray_executor.py) and the local cluster compress starts (local_ray.py).
Workers call qmoe's step functions; qmoe never imports this package (the CLI does, for --workers N)."""
