"""python -m qmoe.export DIR --format compressed-tensors|gguf --out OUT: see qmoe/export/__init__.py."""
import sys

from qmoe.export import main

sys.exit(main())
