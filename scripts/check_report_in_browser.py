"""Open a ``report.html`` in headless Chromium (Debian's ``chromium`` package) and check what it renders.

A copy of the page gets one script at its end that writes, into the document's title, how many images the
browser decoded (with their natural widths) and how many rows each table has; ``--dump-dom`` prints the
rendered document, which is parsed here. The report itself has no script. With ``--screenshot`` the page
is also rendered to a PNG (the one in docs/ is made this way), as tall as the page the browser laid out.

    python scripts/check_report_in_browser.py outputs/runs/<time>/report.html --screenshot docs/report.png
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>
const images = [...document.images].map(i => [i.alt, i.complete ? i.naturalWidth : 0, i.naturalHeight]);
const tables = Object.fromEntries([...document.querySelectorAll("table")].map(t => [t.id, t.rows.length]));
const height = document.documentElement.scrollHeight;
document.title = "PROBE" + JSON.stringify({images, tables, height});
</script>"""


def browser() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


def _run(binary: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def rendered(report: Path, binary: str) -> dict:
    """What Chromium made of ``report``: {"images": [[alt, width, height], ...], "tables": {id: rows},
    "height": the laid-out page's height in pixels}."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        result = _run(binary, ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()])
    found = re.search(r"<title>PROBE(.*?)</title>", result.stdout, re.S)
    if found is None:
        raise RuntimeError(f"chromium did not run the probe (exit {result.returncode}): {result.stderr[-1500:]}")
    return json.loads(html.unescape(found.group(1)))


def screenshot(report: Path, out: Path, binary: str, width: int = 1280, height: int = 2000) -> Path:
    result = _run(binary, [f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
                           report.resolve().as_uri()])
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-1500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--height", type=int, default=None,
                        help="of the screenshot, in pixels (default: the whole page's, as laid out)")
    args = parser.parse_args(argv)
    binary = browser()
    if binary is None:
        print("no Chromium: sudo apt-get install chromium", file=sys.stderr)
        return 2
    seen = rendered(args.report, binary)
    broken = [alt for alt, width, _ in seen["images"] if width == 0]
    print(f"{len(seen['images'])} images ({len(broken)} not decoded), tables: {seen['tables']}")
    if args.screenshot:
        print(screenshot(args.report, args.screenshot, binary, height=args.height or seen["height"]))
    return 1 if broken or not seen["images"] else 0


if __name__ == "__main__":
    sys.exit(main())
