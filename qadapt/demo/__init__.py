"""The demo shipped with qadapt: a small Llama base that learned something, and adapters that change it.

``qadapt.demo.paths()`` says where the files are; ``qadapt demo`` prints the side-by-side table;
``tools/make_demo.py`` (:mod:`qadapt.demo.train`, needs the ``dev`` extra) regenerates them.
"""

from .run import DemoPaths, demo_table, format_table, load_demo, paths

__all__ = ["DemoPaths", "paths", "load_demo", "demo_table", "format_table"]
