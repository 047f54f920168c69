"""Figures for the HTML pages (the leaderboard report, the EDA report): matplotlib on the Agg backend, PNG bytes,
and the data URIs that keep each page one self-contained file."""

from __future__ import annotations

import base64
import io


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG (110 dpi, tight box); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for an ``<img src=...>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
