"""EveryDream2-compatible plugins: ``from plugins.plugins import BasePlugin``, as in EveryDream2.

A train.json entry ``"plugins": ["plugins.my_plugin.MyPlugin"]`` finds ``my_plugin.py`` in a
``plugins/`` folder of the working directory or of train.json's folder (searched first), then
in this package; see `plugins.loading`.
"""
