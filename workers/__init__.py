"""qmoe.workers: Ray. The walk's executor on a pool of actors (`ray_executor.py`) and the loopback, token-auth
local Ray that compress starts (`local_ray.py`). Workers call qmoe's step functions; the library never imports this
package (the CLI does, for --workers N). Installed as `qmoe.workers` from the repository's top-level `workers/`
folder: the bare name `workers` is another distribution's on PyPI."""
