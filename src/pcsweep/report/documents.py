"""report.html and report.md, written from the same parts so that they never disagree: the runs, what is not shown
and why, the claims, then one ``Section`` per figure or table. The html embeds its figures: one self-contained file."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from pcsweep.report.claims_facts import claims_frame
from pcsweep.report.sweep import Sweep, summary_frame

PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}img{max-width:100%;"
    "margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;"
    "border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
)


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)


def _table_md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g")  # pandas writes it with tabulate (a dependency)


@dataclass
class Section:
    """One part of report.html and report.md: a heading, what it shows, its tables (caption, frame) and figures."""

    title: str
    text: str
    images: list[Path] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    @property
    def shown(self) -> list[tuple[str, pd.DataFrame]]:
        return [(caption, table) for caption, table in self.tables if not table.empty]

    def html(self) -> list[str]:
        parts = [f"<h2>{html.escape(self.title)}</h2><p>{html.escape(self.text)}</p>"]
        for caption, table in self.shown:
            parts += ([f"<p><b>{html.escape(caption)}</b></p>"] if caption else []) + [_table_html(table)]
        return parts + [f'<img src="{_embed(p)}" alt="{html.escape(p.name)}">' for p in self.images]

    def markdown(self) -> list[str]:
        lines = [f"## {self.title}", "", self.text, ""]
        for caption, table in self.shown:
            lines += ([f"**{caption}**", ""] if caption else []) + [_table_md(table), ""]
        return lines + [f"![{p.stem}]({p.name})" for p in self.images] + [""]


def claims_parts(results: list[dict]) -> tuple[list[str], list[str]]:
    """The claims section: per claim its verdict, what was measured, and one row per setting (html, markdown)."""
    intro = (
        "Each claim of the paper as measured here; the verdict rules and thresholds are in the README and in "
        "claims.json. Intervals are 95% Student-t intervals over seeds (paired by seed)."
    )
    html_parts, md = (
        ["<h2>The paper's claims</h2>", f"<p>{html.escape(intro)}</p>"],
        ["## The paper's claims", "", intro, ""],
    )
    frame = claims_frame(results)
    for claim in results:
        head = f"Claim {claim['id']}: {claim['claim']} — {claim['verdict']}" + (
            f" ({claim['reason']})" if claim["reason"] else ""
        )
        rows = frame[frame["claim"] == claim["id"]].drop(columns=["claim"])
        html_parts += [
            f"<h3>{html.escape(head)}</h3>",
            f"<p><i>{html.escape(claim['statistic'])}</i></p>",
            _table_html(rows),
        ]
        md += [f"### {head}", "", f"*{claim['statistic']}*", "", _table_md(rows), ""]
    return html_parts, md


def _not_shown(sweep: Sweep) -> list[str]:
    """Runs the figures leave out, and why."""
    notes = [f"{s['model']}: {s['reason']}" for s in sweep.skipped]
    notes += [
        f"{r.label} ({r.summary['dataset']}): diverged ({r.summary.get('diverged_reason') or 'non-finite'}), "
        "left out of the figures"
        for r in sweep.runs
        if r.summary["status"] == "diverged"
    ]
    notes += [
        f"{r.label} ({r.summary['dataset']}): failed to learn (final accuracy "
        f"{r.summary.get('final_test_acc') or 0:.3f}), left out of the figures and rankings"
        for r in sweep.runs
        if r.summary["status"] == "failed_to_learn"
    ]
    return notes


def _runs_parts(sweep: Sweep) -> tuple[list[str], list[str]]:
    """The documents' head: the title, every run's row, and what is not shown and why (html, markdown)."""
    frame = summary_frame(sweep).drop(columns=["twin"])
    notes = _not_shown(sweep)
    parts = [f"<h1>pcsweep report: {html.escape(sweep.path.name)}</h1>", "<h2>Runs</h2>", _table_html(frame)]
    if notes:
        parts += ["<h2>Not shown</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    md = [f"# pcsweep report: {sweep.path.name}", "", "## Runs", "", _table_md(frame), ""]
    if notes:
        md += ["## Not shown", ""] + [f"- {n}" for n in notes] + [""]
    return parts, md


def write_documents(
    sweep: Sweep, out: Path, sections: Sequence[Section], claims: Optional[list[dict]] = None
) -> tuple[Path, Path]:
    """report.html (figures embedded) and report.md: the runs, what is not shown, the claims, then ``sections``
    (a section with neither a figure nor a non-empty table is left out)."""
    parts, md = _runs_parts(sweep)
    if claims is not None:
        claim_html, claim_md = claims_parts(claims)
        parts += claim_html
        md += claim_md
    for section in sections:
        if section.images or section.shown:
            parts += section.html()
            md += section.markdown()
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>pcsweep report</title>"
        f"<style>{PAGE_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    md_path.write_text("\n".join(md))
    return html_path, md_path
