"""Not imported: this directory goes on PYTHONPATH under `gpupool run` (see sitecustomize.py).

Note: this file only makes setuptools ship the directory (and its sitecustomize.py) as a
package in wheels, so `gpupool run` works from a normal install too.
"""
