"""What `python -m flows.pipeline` shows while it runs: one line per stage, a live bar, a summary.

- A stage's whole output (the stage's own prints, DVC's, tqdm's bars) goes to its log file
  (StageLog); only its last state of each progress bar is kept there, not every redraw.
- The console gets a line when a stage starts and when it ends (result, time, its key figure
  from flows.summary.key_figure). While it runs, a rich progress bar follows the tqdm bars the
  stage prints (TRL's training steps, lm-eval's requests, datasets' maps): their counts are read
  from tqdm's own output line, and rich draws the bar and its ETA. In a terminal the start line
  is that live bar; elsewhere (CI, a pipe) a plain "started" line.
- `--verbose` streams every line as before (Prefect's console logging), bars off.
- A failure: the stage, its error (the exception line, not the traceback) and the log path, plus
  a one-line fix where flows.hints knows one.

One PipelineConsole per process (`CONSOLE`), set quiet or verbose by the CLI.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

TAIL_LINES = 30  # lines of a failed stage's output kept for its error message

# tqdm's default line: "<desc>: 45%|####5     | 9/20 [00:05<00:06,  1.80it/s]" (desc optional;
# counts may be unit-scaled: "14.7M/14.7M").
_TQDM = re.compile(r"^(?:(?P<desc>.*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>[\d.]+[kMGTP]?)/(?P<total>[\d.]+[kMGTP]?)\s*\[")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
# The line of a Python traceback that names the exception: "ValueError: ...", "stages.x.EvalError: ..."
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Unavailable|Failed)\b(?::.*)?$")
_DVC_ERROR = re.compile(r"^ERROR: ")


@dataclass(frozen=True)
class Bar:
    """One redraw of a tqdm bar, as read from its output line."""

    desc: str
    n: float
    total: float


def parse_bar(line: str) -> Bar | None:
    """The counts of a tqdm progress line, or None when the line is not one."""
    match = _TQDM.match(line.strip())
    if not match:
        return None

    def number(text: str) -> float:
        suffix = text[-1] if text[-1] in _SCALE else ""
        return float(text[: len(text) - len(suffix)]) * _SCALE[suffix]

    return Bar((match["desc"] or "").strip(), number(match["n"]), number(match["total"]))


def error_of(lines: list[str]) -> str:
    """A failed stage's error in a few lines: the exception line of its traceback (and the lines
    of that message up to DVC's own ERROR line), else DVC's error, else its last line."""
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION.match(lines[i]) and not _DVC_ERROR.match(lines[i]):
            message = [lines[i]]
            for more in lines[i + 1:i + 5]:
                if _DVC_ERROR.match(more) or _EXCEPTION.match(more):
                    break
                message.append(more)
            return "\n".join(message)
    dvc = [line for line in lines if _DVC_ERROR.match(line)]
    if dvc:
        return dvc[-1]
    return lines[-1] if lines else "(no output)"


class StageLog:
    """A stage's output, line by line: into its log file, its progress bars out to a callback.

    feed() returns True for a line that is ordinary output (worth a log record), False for a
    redraw of a progress bar. Only the last redraw of each bar is written to the file.
    """

    def __init__(self, file: Path, on_bar=None) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        self.file = file
        self._out = file.open("a", encoding="utf-8")
        self._on_bar = on_bar
        self._pending_bar: str | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, line: str) -> bool:
        bar = parse_bar(line)
        if bar is not None:
            if self._on_bar is not None:
                self._on_bar(bar)
            if self._pending_bar is not None and not _same_bar(self._pending_bar, line):
                self._write(self._pending_bar)
            self._pending_bar = line
            return False
        self._flush_bar()
        self._write(line)
        self.tail.append(line)
        return True

    def close(self) -> None:
        self._flush_bar()
        self._out.close()

    def _flush_bar(self) -> None:
        if self._pending_bar is not None:
            self._write(self._pending_bar)
            self._pending_bar = None

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()


def _same_bar(a: str, b: str) -> bool:
    first, second = parse_bar(a), parse_bar(b)
    return bool(first and second and (first.desc, first.total) == (second.desc, second.total) and second.n >= first.n)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes} min {seconds:02d} s"


MARKS = {"ran": "[green]✓[/]", "up to date": "[dim]=[/]", "restored from run cache": "[cyan]⤓[/]",
         "failed": "[red]✗[/]"}


class PipelineConsole:
    """The pipeline's console: quiet (stage lines, a live bar, a summary) or verbose (every line)."""

    def __init__(self) -> None:
        self.console = Console(highlight=False)
        self.verbose = False
        self.width = 14  # stage-name column

    def set_verbose(self, verbose: bool) -> None:
        """Verbose: Prefect's console logging shows every stage line (as before). Quiet: Prefect's
        console handlers show nothing (its records still reach the Prefect API: the UI's logs), and
        MLflow's INFO messages in this process (store creation) are dropped."""
        from prefect.logging.handlers import PrefectConsoleHandler

        import mlflow  # noqa: F401 - configures its loggers on import; quieted below, after that

        self.verbose = verbose
        logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
        for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("uvicorn", "fastapi"))):
            for handler in logger.handlers:
                if isinstance(handler, PrefectConsoleHandler):
                    handler.setLevel(logging.NOTSET if verbose else logging.CRITICAL + 1)

    def print(self, text: str = "") -> None:
        self.console.print(text, soft_wrap=True)

    def plan(self, order: list[str], log_dir: Path) -> None:
        self.width = max([len(s) for s in order] + [self.width])
        self.print(f"[bold]pipeline[/]: {' → '.join(order)}  [dim](stage logs: {escape(_relative(log_dir))})[/]")

    @contextlib.contextmanager
    def stage(self, name: str, log_file: Path, attempt: int = 1) -> Iterator[StageLog]:
        """A stage's output stream. In quiet mode in a terminal, a live bar runs while the block
        does (its start line); elsewhere a plain start line is printed."""
        label = f"{name:<{self.width}}" + (f" (attempt {attempt})" if attempt > 1 else "")
        if self.verbose or not self.console.is_terminal:
            self.print(f"[dim]▶ {label} started[/]")
            progress, on_bar = contextlib.nullcontext(), None
        else:
            progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("•"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            on_bar = _bar_follower(progress, label)
        log = StageLog(log_file, on_bar)
        with progress:
            try:
                yield log
            finally:
                log.close()

    def stage_done(self, name: str, result: str, seconds: float | None, figure: str = "") -> None:
        mark = MARKS.get(result, "•")
        figure = f"  {escape(figure)}" if figure else ""
        self.print(f"{mark} {name:<{self.width}} {result:<11} {_seconds(seconds):>10}{figure}")

    def failure(self, stage: str, error: str, log_file: Path | None, fix: str | None) -> None:
        lines = error.splitlines() or ["(no message)"]
        self.print(f"\n[bold red]error[/]: stage [bold]{stage}[/] failed: {escape(lines[0])}")
        for more in lines[1:]:
            self.print(f"  {escape(more)}")
        if log_file is not None:
            self.print(f"  log: {escape(_relative(log_file))}")
        if fix:
            self.print(f"  [bold]fix[/]: {escape(fix)}")

    def summary(self, stages: list[dict[str, Any]], accuracy: list[dict[str, Any]], decision: str,
                paths: dict[str, str]) -> None:
        """The closing table: stages and times, base/SFT/GRPO accuracy, the registry decision, where things are."""
        table = Table(title="pipeline run", title_justify="left", show_edge=False, pad_edge=False)
        for column in ("stage", "result", "time", "key figure"):
            table.add_column(column, justify="right" if column == "time" else "left")
        for s in stages:
            table.add_row(s["stage"], s["result"], _seconds(s.get("seconds")), escape(s.get("figure") or ""))
        self.print()
        self.console.print(table)
        if any(row["strict"] is not None for row in accuracy):
            scores = Table(title="GSM8K accuracy (95% Wilson interval)", title_justify="left", show_edge=False,
                           pad_edge=False)
            for column in ("model", "strict", "flexible", "questions"):
                scores.add_column(column)
            for row in accuracy:
                scores.add_row(row["model"], row["strict_text"], row["flexible_text"], str(row["n"] or "-"))
            self.print()
            self.console.print(scores)
        self.print()
        if decision:
            self.print(f"[bold]registry[/]: {escape(decision)}")
        for label, value in paths.items():
            self.print(f"[bold]{label}[/]: {escape(value)}")


def _bar_follower(progress: Progress, label: str):
    """A callback that moves a rich task along with the stage's tqdm bars (a new bar resets it)."""
    task_id = progress.add_task(label, total=None)
    current: dict[str, Any] = {}

    def on_bar(bar: Bar) -> None:
        if (bar.desc, bar.total) != (current.get("desc"), current.get("total")):
            current.update(desc=bar.desc, total=bar.total)
            progress.reset(task_id, total=bar.total, description=f"{label} {escape(bar.desc)}" if bar.desc else label)
        progress.update(task_id, completed=bar.n)

    return on_bar


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


CONSOLE = PipelineConsole()
