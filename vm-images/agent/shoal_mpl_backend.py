"""Matplotlib backend of the Shoal kernel (MPLBACKEND=module://shoal_mpl_backend).

Agg rendering, like Jupyter's inline backend: plt.show() and the figures still open at the end of
a cell are published as display outputs (image/png via the kernel's figure formatter) and closed.
Loaded by kernel.py only when user code imports matplotlib.pyplot.
"""

import matplotlib
from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def flush_figures():
    managers = Gcf.get_all_fig_managers()
    if not managers:
        return
    from IPython.display import display

    try:
        for manager in managers:
            display(manager.canvas.figure)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


def show(*args, **kwargs):
    flush_figures()


def draw_if_interactive():
    pass


__all__ = ["FigureCanvas", "FigureManager", "flush_figures", "show", "matplotlib"]
