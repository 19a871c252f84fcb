"""Shared look of every figure: one colour per matrix kind, titles, headless figures.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot: no global
backend is selected or required (so rendering works on a machine without a display, and in a
notebook whose backend we must not switch), and a figure is freed as soon as it is dropped
instead of living on in pyplot's figure registry.

Text is drawn as the characters it holds, never as mathtext: titles and legends carry model
names, folder names and revisions we do not control, and matplotlib reads `$...$` in any text as
math (a folder `a$\\bad$b` ended `plot` and `report` in its ValueError). The suptitle is made
literal where it is set (`literal_suptitle`), everything else once the figure is built
(`draw_literally`, from `FigureResult`). No figure of ours draws math; tick labels, which
matplotlib writes as mathtext on log axes (10^k), are left to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.textpath import TextToPath

from svd_probe.kinds import ALL_KINDS

if TYPE_CHECKING:
    from svd_probe.results import Analysis

# One colour per matrix kind, the same in every figure (Okabe-Ito plus a few tab20 tones, so the
# six kinds most figures show stay distinguishable for colour-blind readers).
KIND_COLORS: dict[str, str] = {
    "O": "#D55E00",  # vermillion
    "VO": "#0072B2",  # blue
    "V": "#009E73",  # bluish green
    "Q": "#CC79A7",  # reddish purple
    "K": "#E69F00",  # orange
    "QK": "#56B4E9",  # sky blue
    "Q_pe": "#8C564B",
    "KQ": "#7F7F7F",
    "QA": "#BCBD22",
    "KVA": "#17BECF",
    "KVA_pe": "#9467BD",
    "Qjoint": "#F781BF",
    "KVjoint": "#1B9E77",
}
assert set(KIND_COLORS) == set(ALL_KINDS), "every matrix kind needs a colour"

# Line styles tell models apart in comparison figures, where colour already means the kind.
MODEL_LINESTYLES = ("-", "--", ":", "-.")
MODEL_MARKERS = ("o", "s", "^", "D", "v", "P")

RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "figure.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    # Fixed ids in svg output, so the same cache gives the same file (read at save time).
    "svg.hashsalt": "svd-probe",
}


def kind_color(kind: str) -> str:
    return KIND_COLORS.get(kind, "#333333")


@contextmanager
def plot_style():
    """Our rc settings for the duration of drawing, leaving the caller's rcParams untouched."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float, dpi: float = 100) -> Figure:
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def figure_text(text: str) -> str:
    """`text` as a figure shows it: each line's control characters and lone surrogates (a folder
    name's undecodable byte) as escapes (`report.terminal_text`). A surrogate ended drawing in
    FT2Font's TypeError, and an ESC went raw to the terminal in matplotlib's missing-glyph warning."""
    from svd_probe.report import terminal_text

    return "\n".join(terminal_text(line).plain for line in text.split("\n"))


def literal_suptitle(fig: Figure, text: str, wrap: bool = False) -> Text:
    """The figure's title, drawn as the characters it holds (a model name's `$` is no mathtext);
    with `wrap`, each line wrapped to the figure's width (`fit_lines`)."""
    text = figure_text(text)
    if wrap:  # a long model line must not run off a narrow figure
        size = matplotlib.rcParams["figure.titlesize"]  # points, or a name such as "large"
        text = fit_lines(text, 0.97 * fig.get_figwidth() * 72, size)
    return fig.suptitle(text, ha="left", x=0.01, parse_math=False)


def draw_literally(fig: Figure) -> list[Text]:
    """Every text we put in `fig` made literal (`Text.set_parse_math(False)`, `figure_text`):
    figure and axes titles, axis and colour-bar labels, `ax.text` and annotations, legend entries
    and titles. Tick labels are left as they are (they hold no text of ours). Returns the texts.

    Only each artist's direct children are read: walking the whole tree (`findobj`) would create
    the axes' ticks, outside the rc settings they are drawn with."""
    texts: list[Text] = []

    def take(artists) -> None:
        for a in artists:
            if isinstance(a, Text):
                texts.append(a)
            elif isinstance(a, Legend):
                texts.extend([*a.texts, a.get_title()])

    take(fig.get_children())
    for ax in fig.axes:
        take(ax.get_children())  # titles, texts, annotations, the legend; axes, not their ticks
        texts += [ax.xaxis.label, ax.yaxis.label]
    for t in texts:
        t.set_parse_math(False)
        shown = figure_text(t.get_text())
        if shown != t.get_text():
            t.set_text(shown)
    return texts


def pct(error: float) -> str:
    """0.01 → '1%', 0.001 → '0.1%'."""
    return f"{error * 100:.6g}%"


# Two measures that are easy to confuse, named apart on every figure. The energy error of rank r
# is Σ_{i>r} σ_i² / Σ σ_i² (the share of ‖A‖_F² left out); the relative Frobenius error is its
# square root, ‖A − A_r‖_F / ‖A‖_F. "Rank at 1% energy error" is the smallest r whose energy error
# is ≤ 1%, i.e. whose relative Frobenius error is ≤ 10%.
FROBENIUS_ERROR = "relative Frobenius error ‖A − A_r‖_F / ‖A‖_F"


def energy_error(error: float) -> str:
    """0.01 → '1% energy error'."""
    return f"{pct(error)} energy error"


def rank_at(error: float) -> str:
    """0.01 → 'rank at 1% energy error'."""
    return f"rank at {energy_error(error)}"


_SI_PREFIXES = ("", "k", "M", "G", "T", "P")


def si(value: float, unit: str = "") -> str:
    """A count with 3 significant digits and an SI prefix: 163840 → '164 k', 2.35e8 FLOP → '235 MFLOP'.

    matplotlib's EngFormatter fixes the number of decimals rather than of significant digits
    ('0.2 M' and '117.4 M' alike), hence this helper.
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}".rstrip()
    rounded = float(f"{abs(value):.3g}")  # round first: 999,999 is '1.00 M', not '1e+03 k'
    step = min(max(0, int(math.floor(math.log10(rounded))) // 3), len(_SI_PREFIXES) - 1)
    mantissa = rounded / 1000**step
    decimals = max(0, 2 - int(math.floor(math.log10(mantissa)))) if mantissa >= 1 else 3
    sign = "-" if value < 0 else ""
    return f"{sign}{mantissa:.{decimals}f} {_SI_PREFIXES[step]}{unit}".rstrip()


def short_revision(analysis: Analysis) -> str:
    """'main @ 1a2b3c4d' or, when a commit was asked for, just the short commit."""
    short = analysis.commit[:8]
    if re.fullmatch(r"[0-9a-f]{40}", analysis.revision or ""):
        return short
    return f"{analysis.revision} @ {short}"


def options_text(analysis: Analysis) -> str:
    o = analysis.options
    return (
        ("norms folded" if o.fold_norms else "norms not folded")
        + ", "
        + ("heads normalized before stacking" if o.normalize_stacked else "raw heads stacked")
        + (f"; {o.control} control (randomized weights)" if getattr(o, "control", None) else "")
    )


def model_line(analysis: Analysis) -> str:
    return f"{analysis.display} ({short_revision(analysis)}; {options_text(analysis)})"


def title(analyses: Analysis | Iterable[Analysis], what: str, threshold: str | None = None) -> str:
    """Figure title: what is drawn, then model, revision, options, threshold (one line each)."""
    items: list[Analysis] = list(analyses) if isinstance(analyses, (list, tuple)) else [analyses]  # type: ignore[list-item]
    lines = [what + (f" — {threshold}" if threshold else "")]
    lines += [model_line(a) for a in items]
    return "\n".join(lines)


def text_width(text: str, fontsize: float | str) -> float:
    """Width in points of one line of `text` at `fontsize`, in the current rc font (no renderer needed)."""
    width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return float(width)


def fit_lines(text: str, width_pt: float, fontsize: float | str) -> str:
    """`text` with each line wrapped at spaces so that none is wider than `width_pt` at `fontsize`.

    A word longer than the width stays whole on its own line.
    """
    out: list[str] = []
    for line in text.split("\n"):
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and text_width(candidate, fontsize) > width_pt:
                out.append(current)
                current = "  " + word  # continuation lines are indented
            else:
                current = candidate
        out.append(current)
    return "\n".join(out)


def model_slug(analysis_or_name) -> str:
    """A file-system-safe name for a model: alias, org--name, or a local folder's name."""
    ref = getattr(analysis_or_name, "ref", None)
    if ref is not None:
        name = ref.alias or (ref.repo_id.replace("/", "--") if ref.repo_id else ref.local_path.name)
        control = getattr(getattr(analysis_or_name, "options", None), "control", None)
        name += f"-{control}-control" if control else ""  # never the real analysis' folder
    else:
        name = str(analysis_or_name).replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._\-]+", "_", name)
    # "." or ".." (`align ..`, a checkpoint in the parent folder) would name no folder of its own:
    # plots/.. is the folder plots/ is in.
    return slug if slug.strip(".") else slug.replace(".", "_") or "_"
