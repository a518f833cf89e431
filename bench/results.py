"""Writes benchmark tables into bench/RESULTS.md, one section per benchmark, stamped with the
device, commit and date, replacing that section's previous table."""

import datetime
import os
import platform
import re
import subprocess

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def commit() -> str:
    """HEAD's short hash, marked when tracked files differ from it: a table measured on a
    modified tree (or a copy whose git history lags its files) must not pass for HEAD's."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(RESULTS)).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (" + changes" if git("status", "--porcelain", "--untracked-files=no")
                       else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_device() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            name = found.group(1).strip() if found else name
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, device: str, body: str, path: str = RESULTS) -> str:
    """Replaces (or appends) the section `## title` of RESULTS.md; returns the section text.
    When $OUT is set (an output folder, e.g. of a run on another machine), also writes it to
    $OUT/<slug>.md."""
    stamp = f"device: {device}; commit: {commit()}; date: {datetime.date.today().isoformat()}"
    section = f"## {title}\n\n{stamp}\n\n{body.strip()}\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + section)
    with open(path, "w") as f:
        f.write(text)
    if os.environ.get("OUT"):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower()
        with open(os.path.join(os.environ["OUT"], slug + ".md"), "w") as f:
            f.write(section)
    return section
