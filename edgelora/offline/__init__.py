"""Offline bundles: `edgelora bundle OUT` (build.py, wheels.py) and the installer's target side
(install.sh, place.py). README 'Offline bundle' and packaging/README.md describe them."""
