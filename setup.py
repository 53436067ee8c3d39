"""Build script. Metadata lives in pyproject.toml.

The native extension (csrc/) is optional and arrives with its own issue; until then the
package is pure Python. setup.py stays so that the extension build has its place.
"""

from setuptools import setup

setup()
