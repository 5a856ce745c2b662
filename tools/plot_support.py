"""plot_support - what the project's plotting scripts share: matplotlib's pyplot with the
non-interactive Agg backend, installed with pip first when it is missing."""
import subprocess
import sys


def import_pyplot(program):
    """pyplot, or None (with a message on stderr) when matplotlib cannot be had."""
    try:
        import matplotlib
    except ImportError:
        print(f"{program}: installing matplotlib for the plot (pip)", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
        if r.returncode != 0:
            print(f"{program}: pip could not install matplotlib; no plot", file=sys.stderr)
            return None
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
