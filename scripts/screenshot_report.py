"""Screenshot a fer_ray ``report.html`` in headless Chromium and say whether the page fits its window.

    python scripts/screenshot_report.py results/demo/report/report.html /tmp/report.png [--width 1400] [--full-page]

Two Chromium runs on a ``--width``-px window: one takes the screenshot (the top ``--height`` px, or the whole page
with ``--full-page``), one loads a copy of the page with a small script appended that, after the images have
loaded, writes ``document.documentElement.scrollWidth`` and ``clientWidth`` into the DOM, once with every
``<details>`` closed (as the page opens) and once with all of them open, and dumps the DOM (``--dump-dom``). The
page overflows when either scrollWidth exceeds the clientWidth (the window less any vertical scroll bar): then it
scrolls sideways. Prints one verdict line; exit status 0 when it fits, 1 when it overflows, 2 when Chromium is
missing, fails or does not open a window of that width. Needs Debian's ``chromium`` (``apt-get install -y
chromium``) or ``--chromium PATH``; the test suite never needs it (``tests/test_report_html.py`` checks the page's
structure instead).
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

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
MARK = "fer-ray-measure"
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const d = document.documentElement, details = [...document.querySelectorAll("details")];
  const measure = () => ({scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, innerWidth: window.innerWidth,
                          scrollHeight: d.scrollHeight});
  const out = {closed: measure(), details: details.length};
  details.forEach(x => { x.open = true; });
  out.open = measure();
  details.forEach(x => { x.open = false; });
  const pre = document.createElement("pre");
  pre.id = "MARK";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 200));
</script>""".replace("MARK", MARK)


def find_chromium(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile folder."""
    with tempfile.TemporaryDirectory(prefix="fer_ray_chromium_") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)


def measure(binary: str, page: Path, width: int, height: int, timeout: float) -> dict:
    """scrollWidth / clientWidth / innerWidth / scrollHeight of ``page`` with its details closed and open."""
    text = page.read_text(encoding="utf-8")
    probe_html = text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE
    with tempfile.TemporaryDirectory(prefix="fer_ray_probe_") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(probe_html, encoding="utf-8")
        done = chromium(binary, [f"--window-size={width},{height}", "--virtual-time-budget=15000", "--dump-dom",
                                 probe.as_uri()], timeout)
    m = re.search(rf'<pre id="{MARK}">(.*?)</pre>', done.stdout, re.S)
    if not m:
        raise RuntimeError(f"no measurement in Chromium's DOM (exit {done.returncode}): "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    return json.loads(html.unescape(m.group(1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a report.html written by `fer-ray report`")
    ap.add_argument("png", type=Path, help="the screenshot to write")
    ap.add_argument("--width", type=int, default=1400, help="window width in px (default 1400)")
    ap.add_argument("--height", type=int, default=1000, help="window height in px (default 1000)")
    ap.add_argument("--full-page", action="store_true", help="screenshot the whole page (window as tall as it)")
    ap.add_argument("--max-height", type=int, default=6000, help="--full-page: tallest screenshot (default 6000)")
    ap.add_argument("--chromium", help="the browser binary (default: chromium, chromium-browser or google-chrome)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per Chromium run (default 120)")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"screenshot_report: {args.report}: no such file", file=sys.stderr)
        return 2
    binary = find_chromium(args.chromium)
    if binary is None:
        print("screenshot_report: no Chromium found: apt-get install -y chromium, or pass --chromium PATH",
              file=sys.stderr)
        return 2
    page = args.report.resolve()
    try:
        m = measure(binary, page, args.width, args.height, args.timeout)
        height = min(max(args.height, m["closed"]["scrollHeight"]), args.max_height) if args.full_page else args.height
        args.png.parent.mkdir(parents=True, exist_ok=True)
        shot = chromium(binary, [f"--window-size={args.width},{height}", "--virtual-time-budget=15000",
                                 f"--screenshot={args.png.resolve()}", page.as_uri()], args.timeout)
        if not args.png.is_file():
            raise RuntimeError(f"no screenshot written (exit {shot.returncode}): "
                               f"{(shot.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 2
    closed, opened = m["closed"], m["open"]
    if closed["innerWidth"] != args.width:  # the measurement would not be of the window asked for
        print(f"screenshot_report: Chromium's window is {closed['innerWidth']} px wide, not {args.width}",
              file=sys.stderr)
        return 2
    over = [f"{state}: scrollWidth {s['scrollWidth']} > clientWidth {s['clientWidth']}"
            for state, s in (("details closed", closed), (f"{m['details']} details open", opened))
            if s["scrollWidth"] > s["clientWidth"]]
    sizes = (f"scrollWidth {closed['scrollWidth']} (details closed) / {opened['scrollWidth']} (open) vs viewport "
             f"{closed['innerWidth']} px (clientWidth {closed['clientWidth']})")
    verdict = "OVERFLOWS" if over else "fits"
    print(f"{verdict}: {page.name} at {args.width} px: {sizes}{'; ' + '; '.join(over) if over else ''}; "
          f"screenshot {args.png} ({args.width}×{height})")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
