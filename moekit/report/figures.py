"""What every report draws with: matplotlib off-screen, figures as embedded PNGs, the metrics
file, and the self-contained page (the run report, the search report and the federation report
share them).

    fig, ax = plt.subplots(); ax.plot(*series(read_metrics(run), "loss/val"))
    page("title", "heading", [("id", "Section", png(fig))])
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["facts_table", "page", "per_layer", "plt", "png", "read_metrics", "series"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {str(run_dir)!r}; is this a moekit run directory?")
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def per_layer(layers: list[int], height: float):
    """One figure with a panel per MoE layer: (fig, [(axis, layer), ...])."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), height), squeeze=False)
    return fig, list(zip(axes[0], layers))


def facts_table(facts: dict) -> str:
    """A two-column table of ``{label: value}``, escaped."""
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in facts.items()) + "</table>"


def page(title: str, heading: str, sections: list[tuple[str, str, str]]) -> str:
    """The self-contained page around ``[(id, title, html content), ...]`` (the run report's and
    the search report's)."""
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(name)}</h2>{content}</section>'
                     for sid, name, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }}
table {{ border-collapse: collapse; margin: .5rem 0; }} th, td {{ text-align: left; padding: .2rem .8rem; }}
th {{ color: #555; font-weight: 600; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
{body}
</body></html>
"""
