"""The rule layers that ship with dumpwatch (*.toml). Installed, this folder is the package
data `dumpwatch.layers` (setup.cfg), which dumpwatch.rules finds with importlib.resources."""
