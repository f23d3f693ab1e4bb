"""Drop-in adapters for other frameworks (threestudio).

Each submodule imports its framework lazily, so none is a dependency of carv."""
