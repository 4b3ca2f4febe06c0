"""matplotlib for the examples' figures, headless; None (and a note saying how to install it) when missing."""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'otter-surgery[plot]'): no PNG drawn")
        return None
    return plt
